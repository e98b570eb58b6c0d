"""Credentials: a broker that requires a password, the password from the environment or a file, and a refused
connection reported with the broker's reason, once, while the supervisor keeps retrying."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Broker, MqttProbe, SupervisorFactory

USER, PASSWORD = "alice", "s3cret"


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    workdir = tmp_path_factory.mktemp("auth-broker")
    passwords = workdir / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), USER, PASSWORD], check=True)
    broker = Broker(workdir, access=f"allow_anonymous false\npassword_file {passwords}\n")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def auth_supervisors(tmp_path: Path, auth_broker: Broker, prefix: str) -> Iterator[SupervisorFactory]:
    factory = SupervisorFactory(tmp_path, auth_broker, prefix)
    yield factory
    for process in factory.started:
        process.cleanup()


@pytest.fixture
def auth_probe(auth_broker: Broker) -> Iterator[MqttProbe]:
    probe = MqttProbe(auth_broker.port, username=USER, password=PASSWORD)
    yield probe
    probe.close()


def test_password_from_an_environment_variable_connects(
    auth_supervisors: SupervisorFactory, auth_probe: MqttProbe
) -> None:
    auth_probe.subscribe(f"{auth_supervisors.base}/availability")
    auth_supervisors.start(mqtt={"username": USER, "password_env": "SUP_PASSWORD"},
                           environment={"SUP_PASSWORD": PASSWORD})
    auth_probe.wait_for(f"{auth_supervisors.base}/availability", lambda m: m.text == "online")


def test_password_from_a_file_connects(
    auth_supervisors: SupervisorFactory, auth_probe: MqttProbe, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    auth_probe.subscribe(f"{auth_supervisors.base}/availability")
    auth_supervisors.start(mqtt={"username": USER, "password_file": str(secret)})
    auth_probe.wait_for(f"{auth_supervisors.base}/availability", lambda m: m.text == "online")


def test_a_wrong_password_is_reported_with_the_brokers_reason_once_and_never_logged(
    auth_supervisors: SupervisorFactory,
) -> None:
    process = auth_supervisors.start(environment={"MQTT_USERNAME": USER, "MQTT_PASSWORD": "wrong-password"})
    process.wait_log("refused the connection: Not authorized", count=3)  # it keeps retrying ...
    log = process.log()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "refused the connection" in line]
    assert len(warnings) == 1  # ... but warns once; the repeats go to the debug level
    assert "wrong-password" not in log
    assert process.process.poll() is None  # still running, still retrying
