"""Fixtures: a real Mosquitto on a free loopback port, an MQTT probe client, and supervisor processes.

Nothing here mocks paho or multiprocess: the tests drive a real broker and real worker processes and wait for
events with deadlines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import Broker, MqttProbe, descendants, toml, wait_until

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


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


@pytest.fixture
def mqtt(broker: Broker) -> Iterator[MqttProbe]:
    probe = MqttProbe(broker.port)
    yield probe
    probe.close()


# Supervisor processes ---------------------------------------------------------------------------------------------


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
        self.python_path: list[Path] = []  # more directories for the supervisors' imports (a test's own packages)

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
        env["PYTHONPATH"] = os.pathsep.join([*map(str, self.python_path), str(TESTS), str(ROOT)])
        process = SupervisorProcess(path, self.tmp_path / f"supervisor-{len(self.started)}.log", env)
        self.started.append(process)
        return process


@contextlib.contextmanager
def supervisors_on(
    broker: Broker, tmp_path: Path, prefix: str, request: pytest.FixtureRequest
) -> Iterator[SupervisorFactory]:
    """Supervisors for this test on `broker`; all cleaned up after it, their logs shown if it failed."""
    factory = SupervisorFactory(tmp_path, broker, prefix)
    try:
        yield factory
    finally:
        for process in factory.started:
            process.cleanup()
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for process in factory.started:
                sys.stderr.write(f"\n--- supervisor log {process.log_path} ---\n{process.log()[-8000:]}\n")


@pytest.fixture
def supervisors(
    tmp_path: Path, broker: Broker, prefix: str, request: pytest.FixtureRequest
) -> Iterator[SupervisorFactory]:
    with supervisors_on(broker, tmp_path, prefix, request) as factory:
        yield factory


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
