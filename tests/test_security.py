"""Security: a broker that requires a password (from the environment or a file), a refused connection reported with
the broker's reason once while the supervisor keeps retrying, and TLS with the broker's certificate checked."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, SupervisorFactory, supervisors_on
from support import Broker, MqttProbe

from supervisor.ha_entities import node_id

USER, PASSWORD = "alice", "s3cret"


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    workdir = tmp_path_factory.mktemp("auth-broker")
    passwords = workdir / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), USER, PASSWORD], check=True)
    with Broker.serving(workdir, f"allow_anonymous false\npassword_file {passwords}\n") as broker:
        yield broker


@pytest.fixture
def auth_supervisors(
    tmp_path: Path, auth_broker: Broker, prefix: str, request: pytest.FixtureRequest
) -> Iterator[SupervisorFactory]:
    with supervisors_on(auth_broker, tmp_path, prefix, request) as factory:
        yield factory


@pytest.fixture
def auth_probe(auth_broker: Broker) -> Iterator[MqttProbe]:
    probe = MqttProbe(auth_broker.port, username=USER, password=PASSWORD)
    yield probe
    probe.close()


def test_password_from_an_environment_variable_connects(
    auth_supervisors: SupervisorFactory, auth_probe: MqttProbe
) -> None:
    auth_probe.subscribe(f"{auth_supervisors.base}/availability")
    auth_supervisors.start(
        mqtt={"username": USER, "password_env": "SUP_PASSWORD"}, environment={"SUP_PASSWORD": PASSWORD}
    )
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


def make_certificates(directory: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"
    )
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other-ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=some-other-ca",
    )


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    workdir = tmp_path_factory.mktemp("tls-broker")
    make_certificates(workdir)
    access = (
        f"allow_anonymous true\ncafile {workdir / 'ca.crt'}\n"
        f"certfile {workdir / 'server.crt'}\nkeyfile {workdir / 'server.key'}\n"
    )
    with Broker.serving(workdir, access) as broker:
        yield broker


@pytest.fixture
def tls_supervisors(
    tmp_path: Path, tls_broker: Broker, prefix: str, request: pytest.FixtureRequest
) -> Iterator[SupervisorFactory]:
    with supervisors_on(tls_broker, tmp_path, prefix, request) as factory:
        yield factory


def test_tls_with_the_brokers_ca_connects(tls_supervisors: SupervisorFactory, tls_broker: Broker) -> None:
    probe = MqttProbe(tls_broker.port, ca_file=str(tls_broker.workdir / "ca.crt"))
    try:
        probe.subscribe(f"{tls_supervisors.base}/availability")
        tls_supervisors.start(mqtt={"tls": {"enabled": True, "ca_file": str(tls_broker.workdir / "ca.crt")}})
        probe.wait_for(f"{tls_supervisors.base}/availability", lambda m: m.text == "online")
    finally:
        probe.close()


def test_tls_with_an_untrusted_certificate_is_refused_and_reported(
    tls_supervisors: SupervisorFactory, tls_broker: Broker
) -> None:
    process = tls_supervisors.start(
        mqtt={"tls": {"enabled": True, "ca_file": str(tls_broker.workdir / "other-ca.crt")}}
    )
    process.wait_log("cannot reach the broker at 127.0.0.1:")
    process.wait_log("CERTIFICATE_VERIFY_FAILED")
    assert process.process.poll() is None


# Least privilege: secrets stay out of every process's environment, and each worker gets only its own ------------


def environment_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").partition("=")[::2] for e in entries if e)


def test_no_process_holds_a_secret_it_was_not_given_in_its_environment_or_its_memory(
    auth_supervisors: SupervisorFactory, auth_probe: MqttProbe, prefix: str
) -> None:
    auth_probe.subscribe(f"{prefix}/#")
    mine, theirs = f"{prefix}/out/mine", f"{prefix}/out/theirs"
    process = auth_supervisors.start(
        {
            "mine": {"worker": "echo", "topics": [f"{prefix}/in/mine"], "out": mine, "secret_env": "MINE_KEY"},
            "theirs": {"worker": "echo", "topics": [f"{prefix}/in/theirs"], "out": theirs, "secret_env": "THEIR_KEY"},
        },
        mqtt={"username": USER, "password_env": "SUP_PASSWORD"},
        environment={"SUP_PASSWORD": PASSWORD, "MINE_KEY": "mine-123", "THEIR_KEY": "theirs-456", "PLAIN": "kept"},
    )
    auth_probe.wait_for(f"{auth_supervisors.base}/availability", lambda m: m.text == "online")  # the password works
    worker_pid = int(auth_probe.wait_for(f"{mine}/started")[0].text)
    for pid in (process.pid, worker_pid):
        environment = environment_of(pid)
        assert not {"SUP_PASSWORD", "MINE_KEY", "THEIR_KEY"} & set(environment), pid
        assert environment["PLAIN"] == "kept"
    for name, expected in (("MINE_KEY", "mine-123"), ("THEIR_KEY", "<unset>"), ("SUP_PASSWORD", "<unset>")):
        auth_probe.publish(f"{prefix}/in/mine", f"env:{name}")
        assert (
            auth_probe.wait_for(f"{mine}/env", count=1 + ["MINE_KEY", "THEIR_KEY", "SUP_PASSWORD"].index(name))[-1].text
            == expected
        ), name
    for secret in (PASSWORD, "theirs-456"):
        auth_probe.publish(f"{prefix}/in/mine", f"find:{hashlib.sha256(secret.encode()).hexdigest()}")
    found = [m.text for m in auth_probe.wait_for(f"{mine}/found", count=2)]
    assert found == ["0", "0"]  # neither the broker password nor the other worker's key is reachable in its memory


# The shipped access control list --------------------------------------------------------------------------------


def test_with_the_shipped_acl_a_device_account_can_neither_stop_a_worker_nor_spoof_availability(
    tmp_path: Path, prefix: str, request: pytest.FixtureRequest
) -> None:
    workdir = tmp_path / "broker"
    workdir.mkdir()
    passwords = workdir / "passwords"
    accounts = {"supervisor": "sup-pw", "homeassistant": "ha-pw", "sensor": "sensor-pw"}
    for n, (user, password) in enumerate(accounts.items()):
        subprocess.run(
            ["mosquitto_passwd", "-b", *(["-c"] if n == 0 else []), str(passwords), user, password], check=True
        )
    factory_base = f"{prefix}/sup"
    client_id = f"sup-{prefix.replace('/', '-')}"
    acl = (ROOT / "deploy" / "mosquitto.acl").read_text()
    acl = acl.replace("supervisor/#", f"{factory_base}/#").replace("NODE", node_id(client_id))
    (workdir / "acl").write_text(acl)
    access = f"allow_anonymous false\npassword_file {passwords}\nacl_file {workdir / 'acl'}\n"
    with Broker.serving(workdir, access) as broker, supervisors_on(broker, tmp_path, prefix, request) as factory:
        admin = MqttProbe(broker.port, username="homeassistant", password="ha-pw")
        sensor = MqttProbe(broker.port, username="sensor", password="sensor-pw")
        try:
            admin.subscribe(f"{prefix}/#")
            factory.start(
                {"echo": {"topics": [f"{prefix}/in/#"], "out": f"{prefix}/out/echo"}},
                mqtt={"username": "supervisor", "password_env": "SUP_PASSWORD"},
                environment={"SUP_PASSWORD": "sup-pw"},
            )
            admin.wait_for(f"{prefix}/out/echo/started")
            admin.wait_for(f"{factory.base}/availability", lambda m: m.text == "online")
            sensor.publish(f"{prefix}/in/x", "a reading")  # a device still talks to the workers
            admin.wait_for(f"{prefix}/out/echo/echo", lambda m: m.json()["payload"] == "a reading")
            sensor.publish(f"{factory.base}/request/stop", '{"worker": "echo"}')
            sensor.publish(f"{factory.base}/cmd/echo/restart", "PRESS")
            sensor.publish(f"{factory.base}/availability", "offline", retain=True)
            admin.publish(f"{factory.base}/request/status", "")
            status = admin.wait_for(f"{factory.base}/response/status")[-1].json()["status"]
            assert status["workers"]["echo"]["state"] == "running" and status["workers"]["echo"]["restarts"] == 0
            assert admin.received(f"{factory.base}/response/stop") == []
            assert [m.text for m in admin.received(f"{factory.base}/availability")] == ["online"]
            admin.publish(f"{factory.base}/request/stop", '{"worker": "echo"}')  # the admin account may
            assert admin.wait_for(f"{factory.base}/response/stop")[-1].json()["ok"] is True
        finally:
            admin.close()
            sensor.close()
