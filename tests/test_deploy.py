"""The deploy/ artefacts: each one is checked against the code it describes."""

from __future__ import annotations

import configparser
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import SupervisorFactory
from support import MqttProbe, accepts_connections, free_port
from test_health import samples, scrape
from test_supervisor import echo, start

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = json.loads((DEPLOY / "grafana" / "mqtt-home-supervisor.json").read_text())


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel["targets"]]


def test_every_metric_the_dashboard_queries_is_served(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    port = free_port()
    start(supervisors, mqtt, {"echo": echo(prefix)}, {"metrics": {"port": port}})
    served = {name for name, _ in samples(scrape(port))}
    queried = {name for expr in dashboard_exprs() for name in re.findall(r"\b(?:supervisor|process)_[a-z_]+", expr)}
    assert len(queried) >= 17
    assert queried - served == set()


def test_the_dashboard_provisions_from_file_with_a_data_source_variable() -> None:
    assert DASHBOARD["uid"] == "mqtt-home-supervisor"
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    for expr in dashboard_exprs():
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window in ("$__rate_interval", "$__range"), expr
    provisioning = (DEPLOY / "grafana" / "provisioning" / "mqtt-home-supervisor.yaml").read_text()
    assert "apiVersion: 1" in provisioning and "type: file" in provisioning


def test_the_systemd_unit_matches_the_supervisor() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "mqtt-home-supervisor.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and service["KillMode"] == "mixed" and service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "mqtt-home-supervisor" and "WatchdogSec" in service
    assert "--config" in service["ExecStart"] and service["ExecStart"].split()[1:3] == ["-m", "supervisor"]
    config = tomllib.loads((DEPLOY / "config.toml").read_text())
    shutdown_budget = config["supervisor"]["shutdown_timeout_seconds"] + 2 + 2  # + SIGKILL grace + MQTT goodbye
    assert int(service["TimeoutStopSec"]) > shutdown_budget


def test_the_prometheus_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: in CI `make test` installs Debian's prometheus package for it")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = tomllib.loads((DEPLOY / "config.toml").read_text())
    assert f"127.0.0.1:{config['metrics']['port']}" in (DEPLOY / "prometheus.yml").read_text()


def test_the_mosquitto_config_starts_with_persistence(tmp_path: Path) -> None:
    text = (DEPLOY / "mosquitto.conf").read_text()
    assert re.search(r"^persistence true$", text, re.M) and re.search(r"^set_tcp_nodelay true$", text, re.M)
    port = free_port()
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "u", "p"], check=True)
    local = (
        text.replace("listener 1883", f"listener {port} 127.0.0.1")
        .replace("/etc/mosquitto/passwd", str(tmp_path / "passwd"))
        .replace("/etc/mosquitto/acl", str(DEPLOY / "mosquitto.acl"))
        .replace("/var/lib/mosquitto/", f"{tmp_path}/")
    ) + f"user {getpass.getuser()}\n"
    (tmp_path / "mosquitto.conf").write_text(local)
    with (tmp_path / "log").open("wb") as log:
        broker = subprocess.Popen(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(tmp_path / "mosquitto.conf")],
            stdout=log,
            stderr=log,
        )
    try:
        assert accepts_connections(port, broker, 10), (tmp_path / "log").read_text()
    finally:
        broker.terminate()
        broker.wait(10)
    assert (tmp_path / "mosquitto.db").exists()  # persistence wrote its file on the way out


def test_make_run_installs_the_runtime_packages_only_and_make_test_adds_the_extras() -> None:
    def planned(target: str) -> str:
        result = subprocess.run(
            ["make", "--dry-run", "--always-make", target], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return result.stdout

    run = planned("run")
    assert "pip install --quiet --only-binary=msgspec,lxml -e . ||" in run  # with a build fallback (armv7)
    assert "[test" not in run and "pytest" not in run
    assert "pip install --quiet -e '.[test,dev]'" in planned("test")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies_and_scores_at_most_1_5_in_systemd_analyze_security(tmp_path: Path) -> None:
    # The unit as installed, with this checkout standing in for /opt/mqtt-home-supervisor and the shipped config.
    unit = (DEPLOY / "mqtt-home-supervisor.service").read_text()
    local = (
        unit.replace("/opt/mqtt-home-supervisor/.venv/bin/python", sys.executable)
        .replace("/etc/mqtt-home-supervisor/config.toml", str(DEPLOY / "config.toml"))
        .replace("WorkingDirectory=/opt/mqtt-home-supervisor", f"WorkingDirectory={ROOT}")
    )
    path = tmp_path / "mqtt-home-supervisor.service"
    path.write_text(local)
    verify = ["systemd-analyze", "verify", str(path)]
    verified = subprocess.run(verify, check=False, capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for mqtt-home-supervisor\.service: (\d+\.\d)", security.stdout)
    assert found is not None, security.stdout[-2000:]
    assert float(found.group(1)) <= 1.5


def test_the_dashboard_shows_states_as_words_the_version_as_text_the_supervisor_process_and_no_nan_latency() -> None:
    panels = {panel["title"]: panel for panel in DASHBOARD["panels"]}
    for title, words in (("Workers up", {"up", "down"}), ("MQTT connected", {"connected", "disconnected"})):
        (mapping,) = panels[title]["fieldConfig"]["defaults"]["mappings"]
        assert {option["text"] for option in mapping["options"].values()} == words
    assert panels["Version"]["options"]["textMode"] == "name"  # the series name: its legend, the version label
    assert panels["Version"]["targets"][0]["legendFormat"] == "{{version}}"
    for target in panels["Handling latency p50 / p95"]["targets"]:  # an idle worker gets no line instead of NaN
        assert target["expr"].endswith(
            'and on (worker) sum by (worker) (rate(supervisor_message_handling_seconds_count{job=~"$job"}'
            "[$__rate_interval])) > 0"
        )
    exprs = [t["expr"] for title in ("Supervisor process memory", "Supervisor process CPU and open files")
             for t in panels[title]["targets"]]  # fmt: skip
    assert any("process_resident_memory_bytes" in e for e in exprs) and any("process_cpu_seconds" in e for e in exprs)
