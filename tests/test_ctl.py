"""`python -m supervisor --config PATH ctl ...` against a running supervisor: status, restart, stop and start,
over MQTT 5 (correlation data) and MQTT 3.1.1 (the echoed `transaction`), and clear errors when nobody answers."""

from __future__ import annotations

import re
import signal
from typing import Any

import pytest
from conftest import SupervisorFactory, SupervisorProcess
from support import MqttProbe, free_port
from test_cli import run
from test_supervisor import echo, start, started_pids


def ctl(process: SupervisorProcess, *args: str) -> Any:
    return run("--config", str(process.config_path), "ctl", *args, "--timeout", "10")


@pytest.mark.parametrize("protocol", [5, 311])
def test_ctl_shows_the_workers_and_restarts_stops_and_starts_one(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, protocol: int
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix)}, {"mqtt": {"protocol": protocol}})
    out = f"{prefix}/out/echo"
    mqtt.wait_for(f"{supervisors.base}/status", lambda m: m.json()["workers"]["echo"]["state"] == "running")
    shown = ctl(process, "status")
    assert shown.returncode == 0, shown.stderr
    (row,) = [line for line in shown.stdout.splitlines() if line.startswith("echo ")]
    assert re.match(rf"^echo\s+running\s+{started_pids(mqtt, out)[0]}\s+\d+s\s+0\s+0\s+-$", row), row
    restarted = ctl(process, "restart", "echo")
    assert (restarted.returncode, restarted.stdout) == (0, "echo: restarting\n")
    mqtt.wait_for(f"{out}/started", count=2)  # a new process
    stopped = ctl(process, "stop", "echo")
    assert (stopped.returncode, stopped.stdout) == (0, "echo: stopping\n")
    mqtt.wait_for(f"{supervisors.base}/status", lambda m: m.json()["workers"]["echo"]["state"] == "stopped")
    started = ctl(process, "start", "echo")
    assert (started.returncode, started.stdout) == (0, "echo: starting\n")
    mqtt.wait_for(f"{out}/started", count=3)


def test_ctl_says_what_was_refused_and_when_nobody_answers(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix)})
    unknown = ctl(process, "restart", "nobody")
    assert unknown.returncode == 1
    assert unknown.stderr == "error: no worker named 'nobody'; workers: echo\n"
    missing = ctl(process, "restart")
    assert (missing.returncode, missing.stderr) == (2, "error: ctl restart needs a worker name\n")
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    gone = run("--config", str(process.config_path), "ctl", "status", "--timeout", "0.5")
    assert gone.returncode == 1
    assert re.match(r"^error: no supervisor answered on \S+/request/status within 0\.5 s \(is one running", gone.stderr)


def test_ctl_names_a_broker_it_cannot_reach(supervisors: SupervisorFactory) -> None:
    port = free_port()
    path = supervisors.config({}, mqtt={"port": port})
    result = run("--config", str(path), "ctl", "status", "--timeout", "2")
    assert result.returncode == 3
    assert result.stderr.startswith(f"error: cannot reach the broker at 127.0.0.1:{port}: ")
