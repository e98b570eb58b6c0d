"""The memory baseline for a shipped worker: the same service run the way the supervisor replaces, as its own
process with its own paho connection, subscribed to what the worker subscribes to, then idle.

It imports the worker's module (its code and dependencies are loaded) and builds its config, but does not run its
hooks: an idle service of this kind costs at least this much.

Usage: python baseline_service.py PORT MODULE CONFIG_JSON   (prints "ready" once subscribed)
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from contracts import Worker


def main() -> None:
    port, module_name, table = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    module = importlib.import_module(module_name)
    (worker_class,) = [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Worker) and cls is not Worker and cls.__module__ == module_name
    ]
    worker = worker_class()
    worker.config = msgspec.convert(table, worker_class.Config)
    filters = [(s.topic_filter, s.qos) for s in worker.subscriptions()]
    client_id = f"baseline-{uuid.uuid4().hex[:8]}"
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)

    def on_connect(client: paho.Client, *args: Any) -> None:
        client.subscribe(filters or [("bench/idle/none", 0)])

    def on_subscribe(*args: Any) -> None:
        print("ready", flush=True)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.connect("127.0.0.1", port)
    client.loop_forever()


if __name__ == "__main__":
    main()
