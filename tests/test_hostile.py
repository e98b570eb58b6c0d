"""Hostile input: no message from any client or worker stops the supervisor (SPEC section 7).

Each test sends what an attacker on the home network could send, then shows the supervisor still answers.
"""

from __future__ import annotations

import json
import random
import re
import resource
import signal
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import SupervisorFactory, SupervisorProcess, supervisors_on
from support import Broker, MqttProbe, descendants, free_port
from test_health import scrape_until
from test_shipped_workers import SHIPPED, minimal, tables
from test_supervisor import echo, start, wait_echo
from test_worker_ha_responder import config_topic, request
from test_worker_ha_responder import start as start_with_ha

from contracts import Publish
from contracts.decoding import BoundedJson, InputRejected, check_json
from contracts.homeassistant import DiscoveryBundle
from supervisor import config
from supervisor.core import site_of
from supervisor.errors import StateBrokenError
from supervisor.loop import Loop
from supervisor.outbox import Outbox
from supervisor.routing import worker_subscriptions

DEEP = b'{"worker": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"


def status_answered(mqtt: MqttProbe, base: str, count: int = 1) -> dict[str, Any]:
    mqtt.publish(f"{base}/request/status", "")
    status: dict[str, Any] = mqtt.wait_for(f"{base}/response/status", count=count)[-1].json()
    return status


@pytest.mark.parametrize("retain", [False, True])
def test_a_control_request_nested_10000_levels_deep_is_refused_and_the_supervisor_goes_on(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, retain: bool
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix)})
    mqtt.publish(f"{supervisors.base}/request/restart", DEEP, retain=retain)
    if not retain:
        (reply,) = mqtt.wait_for(f"{supervisors.base}/response/restart")
        assert reply.json()["ok"] is False and "nested deeper than 32 levels" in reply.json()["error"]
    assert status_answered(mqtt, supervisors.base)["ok"] is True
    assert process.process.poll() is None
    mqtt.publish(f"{supervisors.base}/request/restart", b"", retain=True)  # clear it


def test_a_control_request_whose_response_topic_has_a_wildcard_gets_no_reply_and_stops_nothing(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix)})
    for topic in (f"{prefix}/answers/+", f"{prefix}/answers/#"):
        mqtt.publish(f"{supervisors.base}/request/status", "", response_topic=topic)
    assert status_answered(mqtt, supervisors.base)["ok"] is True
    assert process.log().count("refused to publish: the topic") == 2


def test_a_worker_publishing_to_a_topic_no_broker_takes_is_refused_and_counted(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix, qos=1)})
    for topic in (f"{prefix}/bad/#", f"{prefix}/bad/+/x", "", f"{prefix}/nul\0x"):
        mqtt.publish(f"{prefix}/in/x", f"forward:{topic}")
    mqtt.publish(f"{prefix}/in/x", "after")
    wait_echo(mqtt, f"{prefix}/out/echo", "after")
    status = mqtt.wait_for(
        f"{supervisors.base}/status", lambda m: m.json()["workers"]["echo"]["errors"].get("publish") == 4
    )
    assert status[-1].json()["outbox_messages"] == 0  # none of them stored


def test_a_forged_entity_bundle_from_the_broker_is_never_taken(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start_with_ha(supervisors, mqtt, prefix, declarer={})
    running = config_topic(prefix, "binary_sensor", "declarer_running", own=True)
    mqtt.wait_for(running)
    forged = DiscoveryBundle(owners=["supervisor", "declarer"], declared={"supervisor": [], "declarer": []})
    mqtt.publish(f"{supervisors.base}/homeassistant/entities", msgspec.msgpack.encode(forged), qos=1)
    # ha_responder handles its messages in order: once this is answered, a forged bundle would have been handled
    request(mqtt, supervisors.base, "list_devices", {})
    assert not [m for m in mqtt.received(running) if m.payload == b""]  # no entity was removed


# The pieces ---------------------------------------------------------------------------------------------------------


def test_json_nested_too_deep_is_refused_before_parsing_but_brackets_in_strings_do_not_count() -> None:
    with pytest.raises(InputRejected, match=r"^nested deeper than 32 levels$"):
        check_json(DEEP)
    check_json(b'{"a": "' + b"[" * 100 + b'\\"' + b"{" * 100 + b'"}')
    check_json(b"[" * 32 + b"]" * 32)
    with pytest.raises(InputRejected, match=r"^33 bytes, more than the 32 allowed$"):
        BoundedJson(max_bytes=32).decode(b'{"a": "' + b"x" * 24 + b'"}')


def test_an_exception_in_a_loop_callback_is_survived_unless_it_says_the_state_is_broken() -> None:
    errors: list[Exception] = []

    def on_error(exc: Exception) -> None:
        if isinstance(exc, StateBrokenError):
            raise exc
        errors.append(exc)

    def divide_by_zero() -> None:
        _ = 1 / 0

    def look_up_a_missing_key() -> None:
        empty: dict[str, int] = {}
        _ = empty["missing"]

    loop = Loop(on_error=on_error)
    ran: list[str] = []
    loop.call_later(0, divide_by_zero)
    loop.call_later(0, lambda: ran.append("next timer"))
    loop.after_wakeup(lambda: ran.append("after wakeup"))
    a, b = socket.socketpair()
    try:
        b.send(b"x")
        loop.add_reader(a, look_up_a_missing_key)
        loop.run_once(max_wait=0.1)
        assert [type(e) for e in errors] == [KeyError, ZeroDivisionError]
        assert ran == ["next timer", "after wakeup"]
        loop.remove_reader(a)
        loop.call_later(0, lambda: (_ for _ in ()).throw(StateBrokenError("outbox gone")))
        with pytest.raises(StateBrokenError):
            loop.run_once(max_wait=0.1)
    finally:
        a.close()
        b.close()
        loop.close()


def test_more_idle_metrics_connections_than_the_descriptor_limit_neither_stop_the_supervisor_nor_keep_prometheus_out(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    port = free_port()
    process = start(supervisors, mqtt, {"echo": echo(prefix)}, {"metrics": {"port": port}})
    resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (64, 64))
    idle = []
    try:
        for _ in range(200):  # connected, and never a byte sent
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        text = scrape_until(port, "supervisor_worker_up", 1, worker="echo")
        assert "supervisor_mqtt_connected 1.0" in text
    finally:
        for conn in idle:
            conn.close()
    assert status_answered(mqtt, supervisors.base)["ok"] is True
    mqtt.publish(f"{prefix}/in/x", "still here")
    wait_echo(mqtt, f"{prefix}/out/echo", "still here")


# Start-up failures: one line naming the cause and the path, exit 1, nothing left running --------------------------


def expect_startup_error(process: SupervisorProcess, pattern: str) -> None:
    assert process.wait(timeout=15) == 1
    log = process.log()
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.fullmatch(pattern, errors[0]), log[-2000:]
    assert descendants(process.pid) == []


def test_a_state_directory_that_cannot_be_created_stops_the_start_with_one_line(
    supervisors: SupervisorFactory, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    process = supervisors.start(
        {"echo": {"topics": ["x"], "out": "y"}}, supervisor={"state_dir": str(tmp_path / "a-file" / "state")}
    )
    expect_startup_error(process, r"error: cannot create the state directory .*/a-file/state: Not a directory")


def test_an_outbox_of_another_schema_stops_the_start_with_one_line_and_no_worker_left(
    supervisors: SupervisorFactory, tmp_path: Path
) -> None:
    (tmp_path / "state").mkdir()
    foreign = sqlite3.connect(tmp_path / "state" / "outbox.sqlite3")
    foreign.execute("CREATE TABLE publications (id INTEGER PRIMARY KEY, something TEXT)")
    foreign.commit()
    foreign.close()
    process = supervisors.start({"echo": {"topics": ["x"], "out": "y"}})
    expect_startup_error(process, r"error: the outbox .*outbox.sqlite3 is not this version's: .* move it aside .*")


def test_a_metrics_port_in_use_stops_the_start_with_one_line(supervisors: SupervisorFactory) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        process = supervisors.start({"echo": {"topics": ["x"], "out": "y"}}, metrics={"port": port})
        expect_startup_error(process, rf"error: cannot serve metrics on 127.0.0.1:{port} .*: Address already in use")


def test_hostile_discovery_configs_neither_pull_in_the_broker_nor_reach_the_control_api_and_are_capped(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start_with_ha(supervisors, mqtt, prefix, max_devices=3)
    base, ha = supervisors.base, f"{prefix}/ha"
    hostile = {
        "everything": {"name": "all", "stat_t": "#"},
        "stopper": {"name": "stopper", "cmd_t": f"{base}/request/stop"},
        "wild": {"name": "wild", "cmd_t": f"{prefix}/x/+"},
        "empty": {"name": "empty", "cmd_t": ""},
    }
    for object_id, discovery in hostile.items():
        mqtt.publish(f"{ha}/switch/evil/{object_id}/config", json.dumps(discovery))
    for n in range(5):
        mqtt.publish(f"{ha}/sensor/many/s{n}/config", json.dumps({"stat_t": f"{prefix}/many/{n}"}))
    listed = request(mqtt, base, "list_devices", {})["devices"]
    assert len(listed) == 3  # the cap
    tracked = {d["id"]: d for d in listed}
    assert tracked["switch/evil/everything"]["state_topic"] is None
    assert tracked["switch/evil/stopper"]["command_topic"] is None
    assert request(mqtt, base, "set_state", {"device": "switch/evil/stopper", "state": "ON"})["ok"] is False
    assert status_answered(mqtt, base)["status"]["workers"]["ha_responder"]["errors"]["devices"] >= 1
    mqtt.publish(f"{prefix}/unrelated", "not for the supervisor")
    assert request(mqtt, base, "get_state", {"device": "switch/evil/everything"})["device"]["state"] is None


# Resource limits ------------------------------------------------------------------------------------------------


def test_a_worker_allocating_without_end_is_stopped_at_its_memory_limit_and_reported(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix, qos=1, memory_limit_mb=64, dead_letter_after_crashes=1)})
    mqtt.publish(f"{prefix}/in/x", "hog")
    status = mqtt.wait_for(
        f"{supervisors.base}/status", lambda m: m.json()["workers"]["echo"]["restart_reasons"].get("memory"), timeout=20
    )
    assert status[-1].json()["workers"]["echo"]["last_exit"] == "exit code 1 (memory)"
    assert "reached its limit: memory_limit_mb = 64" in process.log()
    (letter,) = mqtt.wait_for(f"{supervisors.base}/dead_letter")  # the message in hand is the one blamed
    assert letter.json()["payload"] == "hog"


def test_a_worker_whose_resident_memory_passes_its_limit_is_killed_and_reported(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix, memory_limit_mb=64)})
    # 4 MiB a second: the resident memory passes 64 MiB seconds before the data limit (64 MiB more than at start)
    # would stop an allocation, and the supervisor looks every second once it is past half of it.
    mqtt.publish(f"{prefix}/in/x", "grow:2")
    process.wait_log("over memory_limit_mb = 64; killing it", timeout=40)
    status = mqtt.wait_for(
        f"{supervisors.base}/status", lambda m: m.json()["workers"]["echo"]["restart_reasons"].get("memory")
    )
    assert status[-1].json()["workers"]["echo"]["errors"]["memory"] == 1


# Fuzzing -------------------------------------------------------------------------------------------------------------


def adversarial_payloads(rng: random.Random) -> list[bytes]:
    return [
        DEEP,
        b"[" * 5000,  # deep and unterminated
        b'{"a": ' * 3000,
        b"\xff\xfe\x00\x80 not utf-8",
        bytes(rng.randrange(256) for _ in range(300)),
        b"",
        b"null",
        b"[]",
        b'{"worker": 5, "device": [], "id": {}, "task": null, "items": "x", "reply_to": "#", "state": {"s": 1}}',
        b'{"worker": "nobody"}',
        b'{"reply_to": "", "id": "x", "task": "shorten", "items": ["a"]}',
        b'{"success": {"deep": [1, 2]}, "automation_id": ["x"]}',
        b"9" * 5000,
        b'"' + b"\\u0000" * 1000 + b'"',
        json.dumps({"name": "x", "stat_t": "#", "cmd_t": "+", "avty_t": "", "~": "#"}).encode(),
        b"x" * (1024 * 1024 + 1),  # over [mqtt] max_payload_bytes
    ]


def concrete(topic_filter: str, rng: random.Random) -> str:
    levels = [
        rng.choice(["a", "x1", "light", "kitchen"]) if level == "+" else level for level in topic_filter.split("/")
    ]
    if levels[-1] == "#":
        levels[-1:] = rng.choice([["a"], ["a", "b", "c"], ["state"]])
    return "/".join(levels)


def test_random_and_adversarial_payloads_on_every_subscribed_topic_stop_nothing(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    workers = {name: minimal(name, prefix) for name in SHIPPED}
    mqtt.subscribe(f"{prefix}/#")
    process = supervisors.start(workers, **tables(prefix))
    base = supervisors.base
    every_running = lambda m: {w["state"] for w in m.json()["workers"].values()} == {"running"}  # noqa: E731
    mqtt.wait_for(f"{base}/status", every_running, timeout=20)
    settings = config.load(process.config_path, {})
    site = site_of(settings)
    filters = {s.topic_filter for w in settings.workers for s in worker_subscriptions(w, site)} | {f"{base}/request/+"}
    assert all(f.startswith(prefix) for f in filters)  # nothing outside this test's topics is touched
    rng = random.Random(17)
    retained: set[str] = set()
    sent = 0
    for topic_filter in sorted(filters):
        for payload in adversarial_payloads(rng):
            topic = concrete(topic_filter, rng)
            retain = rng.random() < 0.2
            response_topic = rng.choice([None, None, f"{prefix}/r/#", f"{prefix}/r/+/x", f"{prefix}/ok"])
            mqtt.publish(topic, payload, qos=rng.choice([0, 1]), retain=retain, response_topic=response_topic)
            sent += 1
            if retain:
                retained.add(topic)
    for topic in retained:
        mqtt.publish(topic, b"", retain=True)
    status = status_answered(mqtt, base)["status"]
    assert {name: (w["state"], w["restarts"]) for name, w in status["workers"].items()} == {
        name: ("running", 0) for name in SHIPPED
    }
    assert request(mqtt, base, "list_devices", {})["ok"] is True  # ha_responder still answers
    log = process.log()
    assert "unexpected error in the supervisor's loop" not in log  # nothing even reached the last line of defence
    assert process.process.poll() is None and sent == len(filters) * len(adversarial_payloads(rng)) > 200


# What a broker drops the connection for --------------------------------------------------------------------------


@pytest.fixture
def small_packet_broker(tmp_path: Path) -> Iterator[Broker]:
    (tmp_path / "small").mkdir()
    with Broker.serving(tmp_path / "small", "allow_anonymous true\nmax_packet_size 2000\n") as broker:
        yield broker


def test_a_publication_over_the_brokers_maximum_packet_size_is_refused_and_the_connection_stays(
    small_packet_broker: Broker, tmp_path: Path, prefix: str, request: pytest.FixtureRequest
) -> None:
    with supervisors_on(small_packet_broker, tmp_path, prefix, request) as factory:
        probe = MqttProbe(small_packet_broker.port)
        try:
            start(factory, probe, {"echo": echo(prefix, qos=1)})
            probe.publish(f"{prefix}/in/x", "big:3000")
            probe.publish(f"{prefix}/in/x", "after")
            wait_echo(probe, f"{prefix}/out/echo", "after")
            status = status_answered(probe, factory.base)["status"]
            assert status["workers"]["echo"]["errors"]["publish"] == 1
            assert (status["mqtt"]["reconnects"], status["outbox_messages"]) == (0, 0)
        finally:
            probe.close()


def test_a_stored_publication_the_broker_drops_the_connection_for_is_quarantined_and_the_link_recovers(
    small_packet_broker: Broker, tmp_path: Path, prefix: str, request: pytest.FixtureRequest
) -> None:
    outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")  # as a run before the broker's limit was set left it
    outbox.add("echo", Publish(topic=f"{prefix}/big", payload=b"x" * 3000, qos=1), "old-run-1")
    outbox.add("echo", Publish(topic=f"{prefix}/small", payload=b"fits", qos=1), "old-run-2")
    outbox.close()
    with supervisors_on(small_packet_broker, tmp_path, prefix, request) as factory:
        probe = MqttProbe(small_packet_broker.port)
        try:
            process = start(factory, probe, {"echo": echo(prefix, qos=1)})
            probe.wait_for(f"{prefix}/small")
            process.wait_log("gave up 1 publication(s)")
            assert status_answered(probe, factory.base)["status"]["outbox_messages"] == 0
            process.signal(signal.SIGTERM)
            assert process.wait() == 0
        finally:
            probe.close()
    outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")
    try:
        ((topic, reason, _),) = outbox.quarantined()
        assert (topic, reason, outbox.pending()) == (f"{prefix}/big", "Packet too large", [])
    finally:
        outbox.close()
