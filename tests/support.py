"""Helpers shared by the tests and the benchmark: a real Mosquitto on a free loopback port, an MQTT probe client,
waiting with deadlines, and looking at processes through /proc."""

from __future__ import annotations

import contextlib
import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    """Poll `predicate` until it returns something truthy; fail saying what was awaited after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` in the process tree."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if not process_gone(child):
                found.append(child)
                todo.append(child)
    return found


def accepts_connections(port: int, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll until something accepts TCP connections on 127.0.0.1:`port`; False if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.01)
    return False


# The broker ---------------------------------------------------------------------------------------------------------


class Broker:
    """A real mosquitto on a fixed free loopback port; can be stopped and started again on the same port."""

    def __init__(self, workdir: Path, access: str = "allow_anonymous true\n") -> None:
        if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
            raise RuntimeError("mosquitto is not installed: `make test` installs it, or apt-get install mosquitto")
        self.executable = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = free_port()
        self.workdir = workdir
        self.config = workdir / "mosquitto.conf"
        template = (TESTS / "mosquitto.conf").read_text()
        self.config.write_text(template.format(port=self.port, user=getpass.getuser()) + access)
        self.log = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([self.executable, "-c", str(self.config)], stdout=log, stderr=log)
        if not accepts_connections(self.port, self.process, timeout):
            self.stop()
            raise RuntimeError(f"mosquitto did not accept connections on {self.port}; its log:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    @classmethod
    @contextlib.contextmanager
    def serving(cls, workdir: Path, access: str = "allow_anonymous true\n") -> Iterator[Broker]:
        """A broker started for the body and stopped after it."""
        broker = cls(workdir, access)
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


# The test's own MQTT client ---------------------------------------------------------------------------------------


class Received:
    def __init__(self, msg: paho.MQTTMessage) -> None:
        self.topic = msg.topic
        self.payload = bytes(msg.payload)
        self.qos = msg.qos
        self.retain = bool(msg.retain)
        properties = msg.properties
        self.expiry = getattr(properties, "MessageExpiryInterval", None) if properties else None
        self.correlation_data = getattr(properties, "CorrelationData", None) if properties else None
        self.user_properties = dict(getattr(properties, "UserProperty", [])) if properties else {}

    @property
    def text(self) -> str:
        return self.payload.decode()

    def json(self) -> Any:
        return json.loads(self.payload)

    def __repr__(self) -> str:
        return f"Received({self.topic!r}, {self.payload[:80]!r}, retain={self.retain})"


class MqttProbe:
    """A plain paho client (with its own loop thread) that records everything it receives."""

    def __init__(
        self,
        port: int,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        client_id: str | None = None,
        persistent: bool = False,
    ) -> None:
        """A connected client; `persistent` keeps its session (and queued messages) at the broker across reconnects."""
        self.messages: list[Received] = []
        self._lock = threading.Condition()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}", protocol=protocol
        )
        self.client.on_message = self._on_message
        if username:
            self.client.username_pw_set(username, password)
        if ca_file:
            self.client.tls_set(ca_certs=ca_file)
        self._connected = threading.Event()
        self.client.on_connect = lambda *a: self._connected.set()
        properties = None
        if persistent:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, clean_start=not persistent, properties=properties)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise AssertionError("the probe client did not connect to the broker")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg))
            self._lock.notify_all()

    def subscribe(self, *topic_filters: str, qos: int = 1) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe([(f, qos) for f in topic_filters])
        if not done.wait(10):
            raise AssertionError(f"no SUBACK for {topic_filters}")

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: dict[str, str] | None = None,
    ) -> None:
        properties = None
        if response_topic or correlation_data or user_properties:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation_data:
                properties.CorrelationData = correlation_data
            if user_properties:
                properties.UserProperty = list(user_properties.items())
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos:
            info.wait_for_publish(10)

    def received(self, topic: str, predicate: Callable[[Received], bool] | None = None) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic and (predicate is None or predicate(m))]

    def wait_for(
        self,
        topic: str,
        predicate: Callable[[Received], bool] | None = None,
        timeout: float = 10.0,
        count: int = 1,
    ) -> list[Received]:
        """Wait until `count` messages on `topic` (matching `predicate`) have arrived; returns them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [m for m in self.messages if m.topic == topic and (predicate is None or predicate(m))]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [m for m in self.messages if m.topic == topic]
                    raise AssertionError(
                        f"timed out after {timeout} s waiting for {count} message(s) on {topic}; "
                        f"got {len(found)} matching, {len(seen)} in all: {seen[-5:]}"
                    )
                self._lock.wait(remaining)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def toml(document: dict[str, Any]) -> str:
    """A small TOML writer for the test configs: tables, strings, numbers, booleans, lists of those, and dicts
    inside lists (written as inline tables, so a list of dicts is an array of tables)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {v!r} as TOML")

    def table(name: str, body: dict[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        if name:
            lines.append(f"[{name}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{name}.{k}" if name else k, v)

    table("", document)
    return "\n".join(lines) + "\n"
