"""Delivery guarantees under real faults: nothing lost across worker crashes, broker outages and supervisor kills.

Every test counts distinct messages and asserts that none is missing (duplicates are allowed: at least once).
"""

from __future__ import annotations

import os
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SupervisorFactory, supervisors_on
from support import Broker, MqttProbe, free_port, wait_until
from test_health import scrape_until
from test_supervisor import echo, start, started_pids, wait_echo

from supervisor.outbox import REMOVALS_BATCH, Outbox


def echoed_payloads(probe: MqttProbe, out: str) -> set[str]:
    return {m.json()["payload"] for m in probe.received(f"{out}/echo")}


def publish_numbered(probe: MqttProbe, topic: str, count: int) -> list[str]:
    payloads = [f"m{i}" for i in range(count)]
    for payload in payloads:
        probe.client.publish(topic, payload, qos=1)
    return payloads


def test_kill_9_of_a_worker_mid_stream_loses_nothing(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix, qos=1, stable_after_seconds=0.1, delay_seconds=0.001)})
    out = f"{prefix}/out/echo"
    payloads = publish_numbered(mqtt, f"{prefix}/in/x", 3000)
    for kills in range(1, 4):

        def enough_echoed(k: int = kills) -> bool:
            return len(echoed_payloads(mqtt, out)) >= 600 * k

        wait_until(enough_echoed, 30, f"{600 * kills} echoes")
        os.kill(started_pids(mqtt, out)[-1], signal.SIGKILL)
        mqtt.wait_for(f"{out}/started", count=kills + 1)
    wait_until(lambda: echoed_payloads(mqtt, out) >= set(payloads), 60, "every message to be echoed")
    assert set(payloads) - echoed_payloads(mqtt, out) == set()


def test_a_dead_lettered_message_is_acknowledged_and_not_delivered_again(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    workers = {"echo": echo(prefix, qos=1, dead_letter_after_crashes=2, backoff_min_seconds=0.05)}
    first = start(supervisors, mqtt, workers)
    mqtt.publish(f"{prefix}/in/poison", "crash")
    mqtt.publish(f"{prefix}/in/fine", "after the poison")
    mqtt.wait_for(f"{supervisors.base}/dead_letter")
    wait_echo(mqtt, f"{prefix}/out/echo", "after the poison")
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    supervisors.start(workers)  # same client id: the broker would send anything unacknowledged again
    mqtt.wait_for(f"{prefix}/out/echo/started", count=4)  # 1 + 2 crashes + this run
    mqtt.publish(f"{prefix}/in/fine", "marker")
    wait_echo(mqtt, f"{prefix}/out/echo", "marker")
    assert len(mqtt.received(f"{supervisors.base}/dead_letter")) == 1
    assert len(echoes_of(mqtt, prefix, "after the poison")) == 1


def echoes_of(probe: MqttProbe, prefix: str, payload: str) -> list[dict[str, Any]]:
    return [m.json() for m in probe.received(f"{prefix}/out/echo/echo") if m.json()["payload"] == payload]


def test_kill_9_of_the_supervisor_mid_stream_loses_nothing_after_a_restart(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    workers = {"echo": echo(prefix, qos=1, delay_seconds=0.002)}  # slower than the publisher: a backlog builds
    first = start(supervisors, mqtt, workers)
    out = f"{prefix}/out/echo"
    payloads = publish_numbered(mqtt, f"{prefix}/in/x", 2000)
    wait_until(lambda: len(echoed_payloads(mqtt, out)) >= 400, 30, "400 echoes before the kill")
    first.signal(signal.SIGKILL)
    first.wait()
    supervisors.start(workers)  # same client id and state directory: the session and the outbox carry over
    wait_until(lambda: echoed_payloads(mqtt, out) >= set(payloads), 60, "every message to be echoed after the restart")
    assert set(payloads) - echoed_payloads(mqtt, out) == set()


def test_confirmed_publications_leave_the_outbox_while_the_supervisor_runs(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    # Removals are written after each wake-up's bytes have left (in batches); a kill -9 shows what was written.
    first = start(supervisors, mqtt, {"echo": echo(prefix, qos=1)})
    out = f"{prefix}/out/echo"
    payloads = publish_numbered(mqtt, f"{prefix}/in/x", 2 * REMOVALS_BATCH + 50)
    wait_until(lambda: echoed_payloads(mqtt, out) >= set(payloads), 30, "every message to be echoed")
    first.signal(signal.SIGKILL)
    first.wait()
    outbox = Outbox(supervisors.tmp_path / "state" / "outbox.sqlite3")
    try:
        left = len(outbox.pending())
    finally:
        outbox.close()
    assert left < len(payloads) - REMOVALS_BATCH  # at least the first batch is gone (confirmed long before the end)


def test_worker_to_worker_publications_survive_a_supervisor_kill(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    workers = {
        "sender": echo(prefix, "sender", [f"{prefix}/in/sender"], qos=1, local_only=True),
        "listener": echo(prefix, "listener", [f"{prefix}/bus/#"], qos=1),
    }
    first = start(supervisors, mqtt, workers)
    topics = [f"{prefix}/bus/{i}" for i in range(600)]
    for topic in topics:
        mqtt.client.publish(f"{prefix}/in/sender", f"forward:{topic}", qos=1)

    def heard() -> set[str]:
        return {m.json()["topic"] for m in mqtt.received(f"{prefix}/out/listener/echo")}

    wait_until(lambda: len(heard()) >= 100, 30, "the listener to hear 100 forwarded messages")
    first.signal(signal.SIGKILL)
    first.wait()
    supervisors.start(workers)
    wait_until(lambda: heard() >= set(topics), 60, "every forwarded message to reach the listener")


@pytest.mark.parametrize("dedupe_seconds", [600, 0])
def test_an_outbox_replayed_after_a_kill_9_reaches_a_deduplicating_worker_once(
    tmp_path: Path, prefix: str, request: pytest.FixtureRequest, dedupe_seconds: int
) -> None:
    # No broker at all: every tick stays in the outbox (the broker never confirms it), so the second run replays
    # all of them to the local subscriber, which has handled every one (the metrics show it) before the kill.
    ticks = 40
    (tmp_path / "unused").mkdir()
    nowhere = Broker(tmp_path / "unused")  # never started: a free port that nothing listens on
    port = free_port()
    workers = {
        "ticker": {"out": f"{prefix}/bus", "interval_seconds": 0.01, "count": ticks},
        "tally": {"topics": [f"{prefix}/bus/#"], "dedupe_seconds": dedupe_seconds},
    }
    handled_file = tmp_path / "state" / "workers" / "tally" / "handled.txt"

    def handled() -> list[str]:
        return handled_file.read_text().splitlines() if handled_file.exists() else []

    with supervisors_on(nowhere, tmp_path, prefix, request) as factory:
        first = factory.start(workers, metrics={"port": port})
        scrape_until(port, "supervisor_message_handling_seconds_count", ticks, worker="tally")
        first.signal(signal.SIGKILL)
        first.wait()
        factory.start(workers, metrics={"port": port})
        lines = (2 if dedupe_seconds else 3) * ticks  # the second run's own ticks, and the replays unless dropped
        wait_until(lambda: len(handled()) >= lines, 30, f"{lines} handled messages")
        copies = Counter(line.split()[0] for line in handled())
        if dedupe_seconds:
            scrape_until(port, "supervisor_worker_duplicates_total", ticks, worker="tally")  # every replay dropped
            assert sorted(copies.values()) == [1] * 2 * ticks
        else:  # the replay happened, and without deduplication every replayed tick was handled twice
            assert sorted(copies.values()) == [1] * ticks + [2] * ticks


@pytest.mark.parametrize("protocol", [5, 311])
def test_every_publication_carries_a_publication_id_under_mqtt_5(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, protocol: int
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix, qos=1)}, {"mqtt": {"protocol": protocol}})
    for payload in ("a", "b"):
        mqtt.publish(f"{prefix}/in/x", payload)
        wait_echo(mqtt, f"{prefix}/out/echo", payload)
    ids = [m.user_properties.get("publication-id") for m in mqtt.received(f"{prefix}/out/echo/echo")]
    status = mqtt.wait_for(f"{supervisors.base}/status")[-1]
    if protocol == 5:
        assert all(ids) and len(set(ids)) == 2
        assert status.user_properties.get("publication-id") not in (None, *ids)
    else:  # MQTT 3.1.1 has no properties: nothing carries an id, so nothing from the broker is ever deduplicated
        assert ids == [None, None] and status.user_properties == {}


def test_a_deduplicating_worker_handles_a_repeated_publication_once_and_messages_without_an_id_every_time(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix, qos=1, dedupe_seconds=60)})
    for _ in range(2):
        mqtt.publish(f"{prefix}/in/x", "repeated", user_properties={"publication-id": "abc-1"})
        mqtt.publish(f"{prefix}/in/x", "without an id")
    mqtt.publish(f"{prefix}/in/x", "marker", user_properties={"publication-id": "abc-2"})
    wait_echo(mqtt, f"{prefix}/out/echo", "marker")
    out = f"{prefix}/out/echo"
    assert len(echoes_of(mqtt, prefix, "without an id")) == 2
    (repeated,) = echoes_of(mqtt, prefix, "repeated")
    assert repeated["publication_id"] == "abc-1"
    status = mqtt.wait_for(f"{supervisors.base}/status", lambda m: m.json()["workers"]["echo"].get("duplicates"))
    assert status[-1].json()["workers"]["echo"]["duplicates"] == 1
    assert len(mqtt.received(f"{out}/echo")) == 4


@pytest.fixture(scope="module")
def persistent_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker that keeps sessions and queued messages across its own restarts."""
    workdir = tmp_path_factory.mktemp("persistent-broker")
    with Broker.serving(
        workdir, f"allow_anonymous true\npersistence true\npersistence_location {workdir}/\n"
    ) as broker:
        yield broker


def test_publications_made_while_the_broker_is_down_all_arrive(
    tmp_path: Path, persistent_broker: Broker, prefix: str, request: pytest.FixtureRequest
) -> None:
    client_id = f"probe-{uuid.uuid4().hex[:8]}"
    out = f"{prefix}/out"
    probe = MqttProbe(persistent_broker.port, client_id=client_id, persistent=True)
    with supervisors_on(persistent_broker, tmp_path, prefix, request) as factory:
        probe.subscribe(f"{out}/#")
        process = factory.start({"ticker": {"out": out, "interval_seconds": 0.005}})
        probe.wait_for(f"{out}/tick", count=50)
        probe.close()
        persistent_broker.stop()
        process.wait_log("disconnected from the broker")
        stopped_at = max(int(m.text) for m in probe.received(f"{out}/tick"))
        persistent_broker.start()
        again = MqttProbe(persistent_broker.port, client_id=client_id, persistent=True)
        try:
            again.subscribe(f"{out}/#")
            target = stopped_at + 400  # at 200 a second, well past the ~1 s outage
            again.wait_for(f"{out}/tick", lambda m: int(m.text) >= target, timeout=30)
            seen = {int(m.text) for m in probe.received(f"{out}/tick") + again.received(f"{out}/tick")}
            assert set(range(target)) - seen == set()
        finally:
            again.close()


def test_a_publication_the_broker_refuses_is_reported_and_leaves_the_outbox(
    tmp_path: Path, prefix: str, request: pytest.FixtureRequest
) -> None:
    (tmp_path / "broker").mkdir()
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite #\ntopic deny {prefix}/denied/#\n")
    with (
        Broker.serving(tmp_path / "broker", f"allow_anonymous true\nacl_file {acl}\n") as broker,
        supervisors_on(broker, tmp_path, prefix, request) as factory,
    ):
        probe = MqttProbe(broker.port)
        try:
            process = start(factory, probe, {"echo": echo(prefix, qos=1)})
            probe.publish(f"{prefix}/in/a", f"forward:{prefix}/denied/x")
            process.wait_log("the broker refused publication")  # a PUBACK with a reason code goes through paho
            probe.publish(f"{prefix}/in/b", "after")  # confirmed by a plain PUBACK, the link's own fast path
            wait_echo(probe, f"{prefix}/out/echo", "after")
            log = process.log()
            assert log.count("the broker refused publication") == 1  # dropped from the outbox, never sent again
            assert "Not authorized" in log
        finally:
            probe.close()


# Bad input ----------------------------------------------------------------------------------------------------------


def test_an_oversized_payload_is_dropped_and_counted(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix)}, {"mqtt": {"max_payload_bytes": 100}})
    mqtt.publish(f"{prefix}/in/big", "x" * 200)
    mqtt.publish(f"{prefix}/in/small", "small")
    wait_echo(mqtt, f"{prefix}/out/echo", "small")
    assert echoes_of(mqtt, prefix, "x" * 200) == []
    assert f"dropped a message on {prefix}/in/big for worker echo: 200 bytes" in process.log()


def test_a_retained_message_on_a_command_topic_is_dropped(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    mqtt.publish(f"{prefix}/in/cmd", "stale command", retain=True)
    process = start(supervisors, mqtt, {"echo": echo(prefix, commands=True)})
    mqtt.publish(f"{prefix}/in/cmd", "fresh command")
    wait_echo(mqtt, f"{prefix}/out/echo", "fresh command")
    assert echoes_of(mqtt, prefix, "stale command") == []
    assert "a retained message on a command topic" in process.log()
    mqtt.publish(f"{prefix}/in/cmd", "", retain=True)  # clear it


def test_a_payload_the_worker_cannot_decode_is_counted_as_decode(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix)})
    mqtt.publish(f"{prefix}/in/x", "json:{not json")
    mqtt.publish(f"{prefix}/in/x", "json:{}")
    wait_echo(mqtt, f"{prefix}/out/echo", "json:{}")
    assert f"error (decode): cannot decode the payload on {prefix}/in/x" in process.log()


def test_a_worker_removed_by_a_reload_while_the_broker_is_down_is_unsubscribed_at_the_next_connect(
    tmp_path: Path, persistent_broker: Broker, prefix: str, request: pytest.FixtureRequest
) -> None:
    keep = {"topics": [f"{prefix}/keep/#"], "out": f"{prefix}/out/keep", "qos": 1, "worker": "echo"}
    gone = {"topics": [f"{prefix}/gone/#"], "out": f"{prefix}/out/gone", "qos": 1, "worker": "echo"}
    with supervisors_on(persistent_broker, tmp_path, prefix, request) as factory:
        process = factory.start({"keep": keep, "gone": gone})
        process.wait_log("subscribed to 5 topic filter(s)")
        persistent_broker.stop()
        process.wait_log("disconnected from the broker")
        process.config_path.write_text(factory.config({"keep": keep}).read_text())
        process.signal(signal.SIGHUP)
        process.wait_log("config reloaded (SIGHUP): removed: gone")
        persistent_broker.start()
        process.wait_log(f"unsubscribed from {prefix}/gone/#", timeout=20)
        assert f"unsubscribed from {prefix}/keep/#" not in process.log()
