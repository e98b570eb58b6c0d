"""The baseline a user would write instead of running a service under the supervisor: a plain paho-mqtt client on
paho's own loop thread, TCP_NODELAY on, `on_message` publishing the payload back, nothing else.

Usage: python plain_echo.py PORT IN_TOPIC OUT_TOPIC QOS   (prints "ready" once subscribed; SIGTERM ends it)
"""

from __future__ import annotations

import socket
import sys
import threading
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    port, in_topic, out_topic, qos = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"plain-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5)
    subscribed = threading.Event()

    def on_socket_open(client: paho.Client, userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_connect(client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(in_topic, qos)

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        client.publish(out_topic, msg.payload, qos)

    client.on_socket_open = on_socket_open
    client.on_connect = on_connect
    client.on_subscribe = lambda client, userdata, mid, reasons, properties: subscribed.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not subscribed.wait(10):
        raise SystemExit("not subscribed within 10 s")
    print("ready", flush=True)
    threading.Event().wait()  # until SIGTERM


if __name__ == "__main__":
    main()
