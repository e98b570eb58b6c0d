"""Exact blame: only the message in a worker's handler when it died counts toward its dead-letter limit.

The worker reports the messages it finished once per batch it read, so at a death most of a batch still looks
unfinished; which one was in the handler is known exactly (see `supervisor.worker_loop`), and only that one is blamed.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

from conftest import SupervisorFactory
from support import MqttProbe, wait_until
from test_reload import control
from test_supervisor import echo, echoes, start, started_pids, wait_echo


def stream(mqtt: MqttProbe, topic: str, payloads: list[str]) -> None:
    """Publish `payloads` in order, QoS 1, while the worker sleeps on a first message: they reach it in one batch."""
    mqtt.publish(topic, "sleep:0.5")
    for payload in payloads:
        mqtt.client.publish(topic, payload, qos=1)


def dead_letters(mqtt: MqttProbe, base: str) -> list[dict[str, Any]]:
    return [m.json() for m in mqtt.received(f"{base}/dead_letter")]


def test_three_different_messages_each_crashing_once_in_a_stream_of_100_all_arrive_and_none_is_dead_lettered(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, tmp_path: Path
) -> None:
    out = f"{prefix}/out/echo"
    start(supervisors, mqtt, {"echo": echo(prefix, qos=1, backoff_min_seconds=0.01, backoff_max_seconds=0.05)})
    payloads = [f"m{i}" for i in range(100)]
    for position in (10, 50, 90):
        payloads[position] = f"crash_once:{tmp_path / f'marker-{position}'}"
    stream(mqtt, f"{prefix}/in/x", payloads)
    wait_until(lambda: {e["payload"] for e in echoes(mqtt, out)} >= set(payloads), 30, "every message to be echoed")
    assert len(started_pids(mqtt, out)) == 4  # three deaths
    assert dead_letters(mqtt, supervisors.base) == []
    crashed = {e["payload"]: e["crashes"] for e in echoes(mqtt, out) if e["payload"].startswith("crash_once:")}
    assert sorted(crashed.values()) == [1, 1, 1]
    assert {e["crashes"] for e in echoes(mqtt, out) if not e["payload"].startswith("crash_once:")} == {0}


def test_a_message_that_always_crashes_is_the_one_dead_lettered_after_exactly_k_deaths(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    out = f"{prefix}/out/echo"
    workers = {"echo": echo(prefix, qos=1, dead_letter_after_crashes=3, backoff_min_seconds=0.01)}
    start(supervisors, mqtt, workers)
    payloads = [f"m{i}" for i in range(20)]
    payloads[5] = "crash"
    stream(mqtt, f"{prefix}/in/x", payloads)
    (letter,) = [m.json() for m in mqtt.wait_for(f"{supervisors.base}/dead_letter")]
    assert (letter["payload"], letter["crashes"], letter["worker"]) == ("crash", 3, "echo")
    fine = set(payloads) - {"crash"}
    wait_until(lambda: {e["payload"] for e in echoes(mqtt, out)} >= fine, 30, "every other message to be echoed")
    assert len(started_pids(mqtt, out)) == 4  # the first run and three deaths
    assert echoes(mqtt, out, "crash") == []
    assert len(dead_letters(mqtt, supervisors.base)) == 1


def test_a_worker_killed_with_no_handler_running_blames_no_message(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    # `block` makes a timer sleep: the loop is stuck between messages, so the next message waits unhandled.
    out = f"{prefix}/out/echo"
    start(supervisors, mqtt, {"echo": echo(prefix, qos=1, dead_letter_after_crashes=1)})
    mqtt.publish(f"{prefix}/in/x", "block")
    mqtt.wait_for(f"{out}/blocked")  # `block` was handled (and reported so): the timer is asleep
    mqtt.publish(f"{prefix}/in/x", "waiting")

    def sent_to_the_worker() -> bool:
        return control(mqtt, supervisors, "status", {})["status"]["workers"]["echo"]["inflight"] == 1  # type: ignore[no-any-return]

    wait_until(sent_to_the_worker, 10, "`waiting` to be sent to the worker")
    os.kill(started_pids(mqtt, out)[0], signal.SIGKILL)
    reply = wait_echo(mqtt, out, "waiting")
    assert (reply["attempt"], reply["crashes"]) == (2, 0)  # delivered again, with no crash to its name
    assert dead_letters(mqtt, supervisors.base) == []


def test_a_worker_that_exits_with_code_3_is_a_crash_not_a_failed_start(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix, qos=1)})
    mqtt.publish(f"{prefix}/in/x", "exit:3")  # a poison message: it exits again on every delivery
    status = mqtt.wait_for(f"{supervisors.base}/status", lambda m: m.json()["workers"]["echo"]["restarts"] >= 1)
    worker = status[-1].json()["workers"]["echo"]
    assert set(worker["restart_reasons"]) == {"exit"}
    assert worker["last_exit"] == "exit code 3 (exit)"
    assert worker["errors"].get("start", 0) == 0


def test_a_failed_start_is_reported_as_such(supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str) -> None:
    mqtt.subscribe(f"{prefix}/#")
    supervisors.start({"broken_start": {"backoff_min_seconds": 0.01, "max_restarts": 100}})
    status = mqtt.wait_for(f"{supervisors.base}/status", lambda m: m.json()["workers"]["broken_start"]["restarts"] >= 1)
    worker = status[-1].json()["workers"]["broken_start"]
    assert set(worker["restart_reasons"]) == {"start_failed"}
    assert worker["last_exit"].endswith("(start_failed)")
    assert worker["errors"]["start"] >= 1


def test_a_soak_of_2000_messages_with_random_crashes_dead_letters_exactly_the_poison_and_loses_nothing(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, tmp_path: Path
) -> None:
    out = f"{prefix}/out/echo"
    supervision: dict[str, Any] = {"max_restarts": 1000, "backoff_min_seconds": 0.01, "backoff_max_seconds": 0.02}
    start(supervisors, mqtt, {"echo": echo(prefix, qos=1, dead_letter_after_crashes=3, **supervision)})
    rng = random.Random(16)
    payloads = [f"m{i}" for i in range(2000)]
    crash_once = rng.sample(range(2000), 25)
    for position in crash_once:
        payloads[position] = f"crash_once:{tmp_path / f'marker-{position}'}"
    poison = rng.sample(sorted(set(range(2000)) - set(crash_once)), 2)
    for n, position in enumerate(poison):
        payloads[position] = f"crash:{n}"  # `crash...` exits every time
    for payload in payloads:
        mqtt.client.publish(f"{prefix}/in/x", payload, qos=1)
    fine = set(payloads) - {payloads[p] for p in poison}
    wait_until(lambda: {e["payload"] for e in echoes(mqtt, out)} >= fine, 60, "every message but the poison")
    mqtt.wait_for(f"{supervisors.base}/dead_letter", count=2)
    assert sorted(letter["payload"] for letter in dead_letters(mqtt, supervisors.base)) == ["crash:0", "crash:1"]
    assert {letter["crashes"] for letter in dead_letters(mqtt, supervisors.base)} == {3}
    assert len(started_pids(mqtt, out)) == 1 + 25 + 2 * 3
