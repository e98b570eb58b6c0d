"""The supervisor end to end: a real broker, real worker processes, real faults (kill -9, broker restarts)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import SupervisorFactory, SupervisorProcess
from support import Broker, MqttProbe, descendants, process_gone, wait_until


def echo(prefix: str, name: str = "echo", topics: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A `[workers.<name>]` table for the echo test worker."""
    table: dict[str, Any] = {"topics": topics or [f"{prefix}/in/#"], "out": f"{prefix}/out/{name}", **extra}
    if name != "echo":
        table["worker"] = "echo"
    return table


def start(
    supervisors: SupervisorFactory,
    mqtt: MqttProbe,
    workers: dict[str, dict[str, Any]],
    tables: dict[str, dict[str, Any]] | None = None,
) -> SupervisorProcess:
    """Start a supervisor and wait until it is online and every echo worker has announced its pid."""
    mqtt.subscribe(f"{supervisors.prefix}/#")
    process = supervisors.start(workers, **(tables or {}))
    mqtt.wait_for(f"{supervisors.base}/availability", lambda m: m.text == "online")
    for name, table in workers.items():
        if table.get("worker", name) == "echo":
            mqtt.wait_for(f"{table['out']}/started")
    return process


def retained(broker: Broker, topic: str) -> str:
    """The retained payload on `topic`, as a new subscriber sees it."""
    probe = MqttProbe(broker.port)
    try:
        probe.subscribe(topic)
        return probe.wait_for(topic, lambda m: m.retain)[0].text
    finally:
        probe.close()


def started_pids(mqtt: MqttProbe, out: str) -> list[int]:
    return [int(m.text) for m in mqtt.received(f"{out}/started")]


def echoes(mqtt: MqttProbe, out: str, payload: str | None = None) -> list[dict[str, Any]]:
    replies = [m.json() for m in mqtt.received(f"{out}/echo")]
    return [r for r in replies if payload is None or r["payload"] == payload]


def wait_echo(mqtt: MqttProbe, out: str, payload: str, timeout: float = 10.0) -> dict[str, Any]:
    mqtt.wait_for(f"{out}/echo", lambda m: m.json()["payload"] == payload, timeout=timeout)
    return echoes(mqtt, out, payload)[0]


# Routing ------------------------------------------------------------------------------------------------------------


def test_worker_receives_what_it_subscribed_to_and_its_publications_reach_the_broker(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix, qos=1)})
    mqtt.publish(f"{prefix}/in/a/b", "hello")
    reply = wait_echo(mqtt, f"{prefix}/out/echo", "hello")
    assert reply == {
        "worker": "echo",
        "topic": f"{prefix}/in/a/b",
        "payload": "hello",
        "qos": 1,
        "retain": False,
        "response_topic": None,
        "attempt": 1,
        "crashes": 0,
        "publication_id": None,  # the probe gives none
        "pid": started_pids(mqtt, f"{prefix}/out/echo")[0],
    }
    mqtt.publish(f"{prefix}/elsewhere", "not for echo")
    mqtt.publish(f"{prefix}/in/c", "marker")
    wait_echo(mqtt, f"{prefix}/out/echo", "marker")
    assert echoes(mqtt, f"{prefix}/out/echo", "not for echo") == []


def test_wildcards_route_each_message_to_every_matching_worker(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(
        supervisors,
        mqtt,
        {
            "lights": echo(prefix, "lights", [f"{prefix}/in/+/light"]),
            "all": echo(prefix, "all", [f"{prefix}/in/#"]),
        },
    )
    mqtt.publish(f"{prefix}/in/kitchen/door", "door")
    mqtt.publish(f"{prefix}/in/kitchen/light", "light")
    wait_echo(mqtt, f"{prefix}/out/lights", "light")
    wait_echo(mqtt, f"{prefix}/out/all", "light")
    assert [r["payload"] for r in echoes(mqtt, f"{prefix}/out/all")] == ["door", "light"]
    assert [r["payload"] for r in echoes(mqtt, f"{prefix}/out/lights")] == ["light"]  # door would have come first


@pytest.mark.parametrize("protocol", [5, 311])
def test_messages_reach_the_worker_intact_whatever_their_qos_retain_flag_and_properties(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, protocol: int
) -> None:
    # Plain QoS 0 and 1 messages take the link's own fast path; QoS 2 and messages with properties go through paho.
    mqtt.publish(f"{prefix}/in/kept", "kept \xe9", qos=1, retain=True)  # delivered with the retain flag on subscribe
    start(supervisors, mqtt, {"echo": echo(prefix, qos=2)}, {"mqtt": {"protocol": protocol}})
    expected: dict[str, tuple[str, int, bool, str | None]] = {"kept \xe9": (f"{prefix}/in/kept", 1, True, None)}
    for qos in (0, 1, 2):
        mqtt.publish(f"{prefix}/in/q{qos}", f"qos {qos}", qos=qos)
        expected[f"qos {qos}"] = (f"{prefix}/in/q{qos}", qos, False, None)
    mqtt.publish(f"{prefix}/in/asks", "with properties", qos=1, response_topic=f"{prefix}/answers")
    expected["with properties"] = (f"{prefix}/in/asks", 1, False, f"{prefix}/answers" if protocol == 5 else None)
    for payload, (topic, qos, retain, response_topic) in expected.items():
        reply = wait_echo(mqtt, f"{prefix}/out/echo", payload)
        assert (reply["topic"], reply["qos"], reply["retain"], reply["response_topic"]) == (
            topic,
            qos,
            retain,
            response_topic,
        ), payload


def test_messages_larger_than_a_socket_read_arrive_intact_between_small_ones(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    # The link and the worker pipes read 64 KiB at a time: these cross several reads each way, packed back to back.
    start(supervisors, mqtt, {"echo": echo(prefix, qos=1)})
    payloads = ["".join(chr(0x41 + (i * 7 + n) % 26) for i in range(300_000 + n)) for n in range(2)]
    sent = [payloads[0], "small", payloads[1], "after"]
    for payload in sent:
        mqtt.publish(f"{prefix}/in/big", payload, qos=1)
    mqtt.wait_for(f"{prefix}/out/echo/echo", lambda m: m.json()["payload"] == "after", timeout=20)
    assert [r["payload"] for r in echoes(mqtt, f"{prefix}/out/echo")] == sent


@pytest.mark.parametrize("protocol", [5, 311])
def test_worker_to_worker_publications_arrive_once_and_local_only_stays_local(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, protocol: int
) -> None:
    start(
        supervisors,
        mqtt,
        {
            "sender": echo(prefix, "sender", [f"{prefix}/in/sender"]),
            "quiet": echo(prefix, "quiet", [f"{prefix}/in/quiet"], local_only=True),
            "listener": echo(prefix, "listener", [f"{prefix}/bus/#"]),
        },
        {"mqtt": {"protocol": protocol}},
    )
    mqtt.publish(f"{prefix}/in/sender", f"forward:{prefix}/bus/shared")
    mqtt.publish(f"{prefix}/in/quiet", f"forward:{prefix}/bus/private")
    mqtt.wait_for(f"{prefix}/bus/shared")
    wait_echo(mqtt, f"{prefix}/out/listener", "from sender")
    wait_echo(mqtt, f"{prefix}/out/listener", "from quiet")
    mqtt.publish(f"{prefix}/bus/marker", "marker")  # a barrier: anything duplicated would have arrived before it
    wait_echo(mqtt, f"{prefix}/out/listener", "marker")
    assert len(echoes(mqtt, f"{prefix}/out/listener", "from sender")) == 1
    assert len(echoes(mqtt, f"{prefix}/out/listener", "from quiet")) == 1
    assert mqtt.received(f"{prefix}/bus/private") == []


# Availability, shutdown and the will ------------------------------------------------------------------------------


def test_sigterm_stops_cleanly_with_offline_retained_and_no_process_left(
    supervisors: SupervisorFactory, mqtt: MqttProbe, broker: Broker, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix)})
    children = descendants(process.pid)
    assert children, "expected the worker process below the supervisor"
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    assert retained(broker, f"{supervisors.base}/availability") == "offline"
    wait_until(lambda: all(process_gone(pid) for pid in children), 5, "every worker process to be gone")
    assert "worker echo stopped: exit code 0" in process.log()


def test_kill_9_of_the_supervisor_publishes_the_will_and_leaves_no_worker(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix)})
    children = descendants(process.pid)
    process.signal(signal.SIGKILL)
    mqtt.wait_for(f"{supervisors.base}/availability", lambda m: m.text == "offline")
    wait_until(
        lambda: all(process_gone(pid) for pid in children),
        5,
        f"the worker processes {children} to exit after the supervisor died",
    )


# Supervision --------------------------------------------------------------------------------------------------------


def test_kill_9_of_a_worker_brings_it_back_receiving_within_seconds(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix)})
    out = f"{prefix}/out/echo"
    (first,) = started_pids(mqtt, out)
    os.kill(first, signal.SIGKILL)
    mqtt.wait_for(f"{out}/started", count=2)  # how fast is measured by `make bench`, not here
    mqtt.publish(f"{prefix}/in/x", "after restart")
    reply = wait_echo(mqtt, out, "after restart")
    assert reply["pid"] == started_pids(mqtt, out)[1] != first


def test_a_handler_exception_is_counted_and_the_worker_goes_on(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix)})
    mqtt.publish(f"{prefix}/in/x", "raise")
    mqtt.publish(f"{prefix}/in/x", "still here")
    reply = wait_echo(mqtt, f"{prefix}/out/echo", "still here")
    assert reply["pid"] == started_pids(mqtt, f"{prefix}/out/echo")[0]
    assert "error (handler): RuntimeError: asked to raise" in process.log()


def test_the_message_in_hand_when_a_worker_dies_is_redelivered_marked(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, tmp_path: Path
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix)})
    payload = f"crash_once:{tmp_path / 'crashed'}"
    mqtt.publish(f"{prefix}/in/x", payload)
    mqtt.publish(f"{prefix}/in/x", "queued behind it")
    reply = wait_echo(mqtt, f"{prefix}/out/echo", payload)
    assert reply["attempt"] == 2
    assert wait_echo(mqtt, f"{prefix}/out/echo", "queued behind it")["attempt"] == 1
    assert len(started_pids(mqtt, f"{prefix}/out/echo")) == 2


def test_a_poison_message_is_dead_lettered_and_the_rest_flows(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix, dead_letter_after_crashes=2, backoff_min_seconds=0.05)})
    mqtt.publish(f"{prefix}/in/poison", "crash")
    mqtt.publish(f"{prefix}/in/fine", "after the poison")
    (letter,) = mqtt.wait_for(f"{supervisors.base}/dead_letter")
    record = letter.json()
    assert {k: record[k] for k in ("worker", "topic", "payload", "attempts", "crashes")} == {
        "worker": "echo",
        "topic": f"{prefix}/in/poison",
        "payload": "crash",
        "attempts": 2,
        "crashes": 2,
    }
    assert record["last_exit"] == "exit code 9 (exit)"
    after = wait_echo(mqtt, f"{prefix}/out/echo", "after the poison")
    assert after["crashes"] == 0  # handed to the dying process too (attempt 2 or 3), but never blamed


def test_a_worker_stuck_on_a_message_is_killed_at_its_deadline_and_restarted(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix, message_deadline_seconds=0.5)})
    mqtt.publish(f"{prefix}/in/x", "hang")
    mqtt.wait_for(f"{prefix}/out/echo/started", count=2, timeout=5)
    assert "spent more than 0.5 s on a message; killing it" in process.log()


def test_a_worker_that_stops_heartbeating_is_killed_and_restarted(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix, heartbeat_timeout_seconds=1.0)})
    mqtt.publish(f"{prefix}/in/x", "block")
    mqtt.wait_for(f"{prefix}/out/echo/started", count=2, timeout=5)
    assert "sent no heartbeat for 1 s; killing it" in process.log()
    mqtt.publish(f"{prefix}/in/x", "alive again")
    wait_echo(mqtt, f"{prefix}/out/echo", "alive again")


def test_a_crash_looping_worker_is_marked_failed_and_the_others_go_on(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(
        supervisors,
        mqtt,
        {
            "broken_start": {"max_restarts": 2, "backoff_min_seconds": 0.05},
            "echo": echo(prefix),
        },
    )
    process.wait_log("worker broken_start failed: more than 2 restarts in 60 s (last: exit code 1 (start_failed))")
    assert process.log().count("worker broken_start starting") == 3
    mqtt.publish(f"{prefix}/in/x", "unaffected")
    wait_echo(mqtt, f"{prefix}/out/echo", "unaffected")
    assert process.process.poll() is None


def test_a_significant_worker_that_fails_stops_the_supervisor_with_exit_1(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    mqtt.subscribe(f"{prefix}/#")
    process = supervisors.start({"broken_start": {"max_restarts": 1, "backoff_min_seconds": 0.05, "significant": True}})
    assert process.wait() == 1
    assert "worker broken_start is significant: stopping the supervisor" in process.log()
    mqtt.wait_for(f"{supervisors.base}/availability", lambda m: m.text == "offline")


# The broker going away ----------------------------------------------------------------------------------------------


def test_broker_restart_on_the_same_port_resumes_the_flow_and_birth(
    supervisors: SupervisorFactory, mqtt: MqttProbe, broker: Broker, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix)})
    mqtt.close()
    broker.stop()
    process.wait_log("disconnected from the broker")
    broker.start()
    assert_echo_flows(broker, supervisors, "after the outage")
    assert retained(broker, f"{supervisors.base}/availability") == "online"


def assert_echo_flows(broker: Broker, supervisors: SupervisorFactory, payload: str) -> None:
    """With a new client: wait for the supervisor to be online, then see `payload` echoed."""
    probe = MqttProbe(broker.port)
    try:
        probe.subscribe(f"{supervisors.prefix}/#")
        probe.wait_for(f"{supervisors.base}/availability", lambda m: m.text == "online")
        probe.publish(f"{supervisors.prefix}/in/x", payload)
        wait_echo(probe, f"{supervisors.prefix}/out/echo", payload)
    finally:
        probe.close()


def test_a_broker_that_is_down_at_boot_is_retried(supervisors: SupervisorFactory, broker: Broker, prefix: str) -> None:
    broker.stop()
    process = supervisors.start({"echo": echo(prefix)})
    process.wait_log("cannot reach the broker at 127.0.0.1:")
    broker.start()
    assert_echo_flows(broker, supervisors, "late broker")
    warnings = [line for line in process.log().splitlines() if "WARNING" in line and "cannot reach" in line]
    assert len(warnings) == 1  # once, not once per attempt


# Environment --------------------------------------------------------------------------------------------------------


def test_workers_never_see_the_service_managers_variables(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    mqtt.subscribe(f"{prefix}/#")
    supervisors.start(
        {"echo": echo(prefix)},
        environment={"NOTIFY_SOCKET": "/run/nowhere", "WATCHDOG_USEC": "1000000", "SUPERVISOR_TEST_VAR": "kept"},
    )
    mqtt.wait_for(f"{prefix}/out/echo/started")
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "SUPERVISOR_TEST_VAR"):
        mqtt.publish(f"{prefix}/in/x", f"env:{name}")
    replies = mqtt.wait_for(f"{prefix}/out/echo/env", count=3)
    assert [r.text for r in replies] == ["<unset>", "<unset>", "kept"]


def test_a_worker_that_overruns_its_shutdown_timeout_is_terminated_and_the_exit_is_still_clean(
    supervisors: SupervisorFactory, mqtt: MqttProbe, broker: Broker, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix, shutdown_timeout_seconds=0.5)})
    mqtt.publish(f"{prefix}/in/x", "sleep:60")
    mqtt.publish(f"{prefix}/in/x", "sleep:0")  # queued behind the sleeper: proof the first one is in its handler
    children = descendants(process.pid)
    process.signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert "worker echo did not stop in time; terminating pid" in process.log()
    assert "worker echo stopped: killed by SIGTERM" in process.log()
    assert retained(broker, f"{supervisors.base}/availability") == "offline"
    wait_until(lambda: all(process_gone(pid) for pid in children), 5, "every worker process to be gone")


# Message expiry -----------------------------------------------------------------------------------------------------


def test_events_carry_the_default_message_expiry_under_mqtt_5(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix)}, {"mqtt": {"message_expiry_seconds": 120}})
    mqtt.publish(f"{prefix}/in/x", "expiring")
    mqtt.wait_for(f"{prefix}/out/echo/echo")
    (reply,) = mqtt.received(f"{prefix}/out/echo/echo")
    assert reply.expiry is not None and 110 <= reply.expiry <= 120
    availability = mqtt.received(f"{supervisors.base}/availability")[0]
    assert availability.expiry is None  # retained state does not expire


def test_no_expiry_is_sent_under_mqtt_311(supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix)}, {"mqtt": {"protocol": 311}})
    mqtt.publish(f"{prefix}/in/x", "plain")
    (reply,) = mqtt.wait_for(f"{prefix}/out/echo/echo")
    assert reply.expiry is None


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_every_start_method_routes_and_restarts(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, method: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix)}, {"supervisor": {"start_method": method}})
    out = f"{prefix}/out/echo"
    mqtt.publish(f"{prefix}/in/x", "before")
    wait_echo(mqtt, out, "before")
    os.kill(started_pids(mqtt, out)[0], signal.SIGKILL)
    mqtt.wait_for(f"{out}/started", count=2)
    mqtt.publish(f"{prefix}/in/x", "after")
    assert wait_echo(mqtt, out, "after")["pid"] == started_pids(mqtt, out)[1]


def test_a_timer_callback_exception_is_counted_and_the_worker_goes_on(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix)})
    mqtt.publish(f"{prefix}/in/x", "timer_raise")
    process.wait_log("error (handler): ZeroDivisionError: division by zero (timer)")
    mqtt.publish(f"{prefix}/in/x", "after the timer")
    assert (
        wait_echo(mqtt, f"{prefix}/out/echo", "after the timer")["pid"] == started_pids(mqtt, f"{prefix}/out/echo")[0]
    )


def test_blocking_work_on_a_thread_leaves_the_worker_free_and_its_failure_is_counted(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    # A heartbeat timeout shorter than the work: the worker's loop must keep heartbeating while the thread sleeps.
    table = echo(prefix, heartbeat_timeout_seconds=2.0)
    process = start(supervisors, mqtt, {"echo": table})
    mqtt.publish(f"{prefix}/in/x", "thread:4")
    mqtt.publish(f"{prefix}/in/x", "meanwhile")
    wait_echo(mqtt, f"{prefix}/out/echo", "meanwhile")
    assert not mqtt.received(f"{prefix}/out/echo/thread")  # answered while the work was still going on
    (result,) = mqtt.wait_for(f"{prefix}/out/echo/thread", timeout=10)
    assert result.text == "slept 4"
    assert len(started_pids(mqtt, f"{prefix}/out/echo")) == 1  # never killed for silence
    mqtt.publish(f"{prefix}/in/x", "thread_raise")
    process.wait_log("error (handler): RuntimeError: asked to raise on a thread (thread result)")


def test_a_subscription_made_while_running_takes_effect_and_delivers_once(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    workers = {"echo": echo(prefix), "other": echo(prefix, "other", topics=[f"{prefix}/other/#"])}
    start(supervisors, mqtt, workers)
    mqtt.publish(f"{prefix}/other/x", f"subscribe:{prefix}/in/x")  # overlaps echo's {prefix}/in/#
    wait_echo(mqtt, f"{prefix}/out/other", f"subscribe:{prefix}/in/x")

    def other_takes_a_probe() -> bool:
        mqtt.publish(f"{prefix}/in/x", "probe")
        return bool(echoes(mqtt, f"{prefix}/out/other", "probe"))

    wait_until(other_takes_a_probe, 10, "the new subscription to take effect")
    for payload in ("hello", "after"):
        mqtt.publish(f"{prefix}/in/x", payload)
    for out in (f"{prefix}/out/echo", f"{prefix}/out/other"):
        wait_echo(mqtt, out, "after")  # a duplicate of "hello" would have come before it
        assert len(echoes(mqtt, out, "hello")) == 1, out


def test_each_process_shows_what_it_is_in_top(supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix), "a_long_worker_name": echo(prefix, "a_long_worker_name")})
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in descendants(process.pid)}
    assert names == {"echo", "a_long_worker_n"}  # Linux keeps 15 bytes of a process name
    lines = {Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] for pid in descendants(process.pid)}
    assert lines == {b"mqtt-home-supervisor: echo", b"mqtt-home-supervisor: a_long_worker_name"}  # as in ps aux
    assert Path(f"/proc/{process.pid}/comm").read_text().strip() == "mqtt-supervisor"
    assert f"status on {supervisors.base}/status (retained); metrics and a status page off;" in process.log()
