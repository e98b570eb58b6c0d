"""The baseline the supervisor is measured against: one process, its own paho connection (TCP_NODELAY on),
republishing every message on `in_topic` to `out_topic` at `qos`. This is the one-connection-per-service design.

Usage: python baseline_echo.py PORT IN_TOPIC OUT_TOPIC QOS   (prints "ready" once subscribed)
"""

from __future__ import annotations

import socket
import sys
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    port, in_topic, out_topic, qos = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"baseline-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5
    )
    client.max_inflight_messages_set(1000)

    def on_socket_open(client: paho.Client, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_connect(client: paho.Client, *args: Any) -> None:
        client.subscribe(in_topic, qos=qos)

    def on_subscribe(*args: Any) -> None:
        print("ready", flush=True)

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        client.publish(out_topic, msg.payload, qos=qos)

    client.on_socket_open = on_socket_open
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_forever()


if __name__ == "__main__":
    main()
