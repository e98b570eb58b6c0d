"""The baseline the supervisor is measured against: the same service (the relay worker) run the way the supervisor
replaces, as its own process with its own paho connection (TCP_NODELAY on), republishing every message on
`in_topic` to `<out_prefix>/baseline` at `qos`.

Usage: python baseline_echo.py PORT IN_TOPIC OUT_PREFIX QOS   (prints "ready" once subscribed)
"""

from __future__ import annotations

import logging
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from testworkers.relay import Relay

from contracts import Message


class PahoContext:
    """Just enough of `contracts.Context` for the relay, on a paho client."""

    def __init__(self, client: paho.Client) -> None:
        self.client = client
        self.name = "baseline"
        self.log = logging.getLogger("baseline")
        self.state_dir = Path(".")

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 0,
        retain: bool = False,
        expiry: int | None = None,
        local_only: bool = False,
    ) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def report_error(self, kind: str, detail: str) -> None:
        self.log.warning("%s: %s", kind, detail)

    def now(self) -> float:
        return time.time()


def main() -> None:
    port, in_topic, out_prefix, qos = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"baseline-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5
    )
    client.max_inflight_messages_set(1000)
    relay = Relay()
    relay.config = msgspec.convert({"topics": [in_topic], "out": out_prefix, "qos": qos}, Relay.Config)
    ctx: Any = PahoContext(client)
    relay.on_start(ctx)
    ids = iter(range(1, 1 << 62))

    def on_socket_open(client: paho.Client, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_connect(client: paho.Client, *args: Any) -> None:
        client.subscribe(in_topic, qos=qos)

    def on_subscribe(*args: Any) -> None:
        print("ready", flush=True)

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        relay.on_message(ctx, Message(id=next(ids), topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos))

    client.on_socket_open = on_socket_open
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_forever()


if __name__ == "__main__":
    main()
