"""Fixtures: a real Mosquitto on a free loopback port, an MQTT probe client, and supervisor processes.

Nothing here mocks paho or multiprocess: the tests drive a real broker and real worker processes and wait for
events with deadlines.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.01)
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

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@pytest.fixture(scope="session")
def session_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = Broker(tmp_path_factory.mktemp("broker"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def broker(session_broker: Broker) -> Broker:
    """The session's broker, started again if an earlier test stopped it."""
    if not session_broker.running:
        session_broker.start()
    return session_broker


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests never see each other's messages."""
    return f"test/{uuid.uuid4().hex[:10]}"


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
        protocol: int = paho.MQTTv5,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Condition()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}", protocol=protocol
        )
        self.client.on_message = self._on_message
        if username:
            self.client.username_pw_set(username, password)
        if ca_file:
            self.client.tls_set(ca_certs=ca_file)
        self._connected = threading.Event()
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.connect("127.0.0.1", port)
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
    ) -> None:
        properties = None
        if response_topic or correlation_data:
            properties = Properties(PacketTypes.PUBLISH)
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation_data:
                properties.CorrelationData = correlation_data
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


@pytest.fixture
def mqtt(broker: Broker) -> Iterator[MqttProbe]:
    probe = MqttProbe(broker.port)
    yield probe
    probe.close()


# Supervisor processes ---------------------------------------------------------------------------------------------


def toml(document: dict[str, Any]) -> str:
    """A small TOML writer for the test configs: tables, strings, numbers, booleans and lists of those."""
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


class SupervisorProcess:
    """`python -m supervisor --config ...` as a child process, with its log kept in a file."""

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str]) -> None:
        self.config_path = config_path
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "--config", str(config_path), "--log-level", "DEBUG"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.pid = self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        wait_until(lambda: self.log().count(text) >= count, timeout, f"{text!r} in the supervisor log")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the supervisor did not exit within {timeout} s; log:\n{self.log()}") from None

    def cleanup(self) -> None:
        """Make sure nothing of this supervisor survives the test (it runs in its own session)."""
        pids = [self.pid, *descendants(self.pid)]
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(15)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(5)


class SupervisorFactory:
    """Writes a config for this test (its own base topic, client id and state directory) and starts supervisors."""

    def __init__(self, tmp_path: Path, broker: Broker, prefix: str) -> None:
        self.tmp_path = tmp_path
        self.broker = broker
        self.prefix = prefix
        self.base = f"{prefix}/sup"
        self.started: list[SupervisorProcess] = []

    def config(self, workers: dict[str, dict[str, Any]], **tables: dict[str, Any]) -> Path:
        document: dict[str, Any] = {
            "supervisor": {
                "base_topic": self.base,
                "state_dir": str(self.tmp_path / "state"),
                "worker_packages": ["testworkers"],
                "shutdown_timeout_seconds": 5.0,
            },
            "mqtt": {
                "host": "127.0.0.1",
                "port": self.broker.port,
                "client_id": f"sup-{self.prefix.replace('/', '-')}",
            },
            "metrics": {"port": 0},
            "workers": workers,
        }
        for name, values in tables.items():
            document.setdefault(name, {}).update(values)
        path = self.tmp_path / f"config-{len(self.started)}.toml"
        path.write_text(toml(document))
        return path

    def start(
        self,
        workers: dict[str, dict[str, Any]] | None = None,
        environment: dict[str, str] | None = None,
        **tables: dict[str, Any],
    ) -> SupervisorProcess:
        path = self.config(workers or {}, **tables)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_")} | (environment or {})
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)])
        process = SupervisorProcess(path, self.tmp_path / f"supervisor-{len(self.started)}.log", env)
        self.started.append(process)
        return process


@pytest.fixture
def supervisors(
    tmp_path: Path, broker: Broker, prefix: str, request: pytest.FixtureRequest
) -> Iterator[SupervisorFactory]:
    factory = SupervisorFactory(tmp_path, broker, prefix)
    yield factory
    for process in factory.started:
        process.cleanup()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for process in factory.started:
            sys.stderr.write(f"\n--- supervisor log {process.log_path} ---\n{process.log()[-8000:]}\n")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
