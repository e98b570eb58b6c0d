"""batch_scheduler under the real supervisor and a real broker: recording, the analysis on demand with its events,
catch-up after downtime, and no overlapping runs.

History and job state are written into the worker's state directory before the supervisor starts, so nothing here
waits for a schedule or for days to pass.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from conftest import SupervisorFactory, SupervisorProcess
from support import MqttProbe, Received, wait_until

from workers._cron import Cron
from workers._history import Recorder
from workers._patterns import analysis_window
from workers.batch_scheduler import BatchSchedulerConfig, entity_of, state_of

BERLIN = ZoneInfo("Europe/Berlin")
SUGGESTIONS = "ha-ai/events/suggestion/generated"
SUMMARY = "ha-ai/status/analysis_complete"


def worker_dir(supervisors: SupervisorFactory) -> Path:
    path = supervisors.tmp_path / "state" / "workers" / "batch_scheduler"
    path.mkdir(parents=True, exist_ok=True)
    return path


def seed_history(supervisors: SupervisorFactory) -> None:
    """Two weeks before today (Berlin): light.hall on at ~07:00 on 12 days, switch.coffee off at ~22:30 on 11,
    and a bedroom light switching at random."""
    rng = random.Random(10)
    start, _ = analysis_window(time.time(), BERLIN, 14)
    first = dt.datetime.fromtimestamp(start, BERLIN).date()
    days = [first + dt.timedelta(days=n) for n in range(14)]
    changes = []
    for day in rng.sample(days, 12):
        changes.append((at(day, 7 * 60 + rng.uniform(-8, 8)), "light.hall", "on"))
    for day in rng.sample(days, 11):
        changes.append((at(day, 22 * 60 + 30 + rng.uniform(-8, 8)), "switch.coffee", "off"))
    for day in days:
        for _ in range(rng.randint(0, 5)):
            changes.append((at(day, rng.uniform(0, 1440)), "light.bedroom", rng.choice(["on", "off"])))
    recorder = Recorder(worker_dir(supervisors) / "history.sqlite3")
    for ts, entity, state in sorted(changes):
        recorder.last_state.clear()  # keep every planted change, even a repeated state
        recorder.record(ts, entity, state)
    recorder.close()


def at(day: dt.date, minute: float) -> float:
    wall = dt.datetime(day.year, day.month, day.day) + dt.timedelta(minutes=minute)
    return wall.replace(tzinfo=BERLIN).timestamp()


def write_last_run(supervisors: SupervisorFactory, job: str, last_run: float) -> None:
    state = {job: {"first_seen_ts": last_run - 30 * 86400, "last_run_ts": last_run, "last_trigger": "interval"}}
    (worker_dir(supervisors) / "jobs.json").write_text(json.dumps(state))


def scheduler(supervisors: SupervisorFactory, **options: Any) -> dict[str, Any]:
    """A `[workers.batch_scheduler]` table: records the test's own topics, analyses daily at 03:30 in Berlin."""
    table: dict[str, Any] = {
        "record_topics": [f"{supervisors.prefix}/home/+/+/state"],
        "time_zone": "Europe/Berlin",
        "jobs": {"analysis": {"cron": "30 3 * * *"}},
    }
    return table | options


def start(supervisors: SupervisorFactory, mqtt: MqttProbe, workers: dict[str, dict[str, Any]]) -> SupervisorProcess:
    """Start a supervisor with the shipped workers; wait until batch_scheduler has published its next run."""
    mqtt.subscribe(f"{supervisors.prefix}/#", SUGGESTIONS, SUMMARY)
    process = supervisors.start(workers, supervisor={"worker_packages": ["workers"]})
    mqtt.wait_for(f"{supervisors.base}/availability", lambda m: m.text == "online")
    mqtt.wait_for(f"{supervisors.base}/batch_scheduler/next_run", timeout=15)
    return process


def press(mqtt: MqttProbe, supervisors: SupervisorFactory) -> float:
    """Press `Run analysis now`; returns the time just before the press."""
    pressed = time.time()
    mqtt.publish(f"{supervisors.base}/cmd/batch_scheduler/run_analysis", "PRESS")
    return pressed


def summaries(mqtt: MqttProbe, job: str = "analysis") -> list[dict[str, Any]]:
    return [m.json() for m in mqtt.received(SUMMARY) if m.json().get("job") == job and "started_ts" in m.json()]


def wait_summary(mqtt: MqttProbe, after: float, timeout: float = 10.0) -> dict[str, Any]:
    """The first summary of a run that started after `after` (time.time() on this host)."""

    def of_run(m: Received) -> bool:
        return bool(m.json().get("started_ts", 0) >= after)

    summary: dict[str, Any] = mqtt.wait_for(SUMMARY, of_run, timeout=timeout)[0].json()
    return summary


def recorded(supervisors: SupervisorFactory) -> list[tuple[str, str]]:
    db = sqlite3.connect(worker_dir(supervisors) / "history.sqlite3")
    try:
        return list(db.execute("SELECT entity, state FROM changes ORDER BY ts"))
    finally:
        db.close()


def status_of_worker(mqtt: MqttProbe, supervisors: SupervisorFactory, **expected: Any) -> dict[str, Any]:
    def matches(m: Received) -> bool:
        worker = m.json().get("workers", {}).get("batch_scheduler", {})
        return all(worker.get(k) == v for k, v in expected.items())

    found = mqtt.wait_for(f"{supervisors.base}/status", matches, timeout=10)
    return dict(found[-1].json()["workers"]["batch_scheduler"])


# Config and parsing (no broker) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"jobs": {"nightly": {"cron": "61 * * * *"}}},
            r'^jobs\.nightly: cron "61 \* \* \* \*": minute 61 is out of range',
        ),
        ({"jobs": {"nightly": {"cron": "0 3 * * *", "interval_seconds": 60}}}, r"^jobs\.nightly: expected exactly one"),
        ({"jobs": {"nightly": {}}}, r"^jobs\.nightly: expected exactly one of `cron` and `interval_seconds`"),
        (
            {"jobs": {"nightly": {"cron": "0 3 * * *", "time_zone": "Mars/Base"}}},
            r'^jobs\.nightly: time_zone "Mars/Base"',
        ),
        ({"time_zone": "Europe/Nowhere"}, r'^time_zone "Europe/Nowhere": not an IANA time zone name'),
        ({"jobs": {"nightly": {"cron": "0 3 * * *", "colour": "red"}}}, r"^Object contains unknown field `colour`"),
    ],
)
def test_a_bad_job_fails_at_config_time_naming_the_job_and_the_fix(section: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(section, BatchSchedulerConfig)


def test_topics_name_entities_and_payloads_hold_states() -> None:
    assert entity_of("homeassistant/statestream/light/hall/state") == "light.hall"
    assert entity_of("home/switch/coffee/state") == "switch.coffee"
    assert entity_of("zigbee2mqtt/hall_lamp") == "zigbee2mqtt.hall_lamp"
    assert [state_of(p) for p in [b"ON", b' "off" ', b'{"state": "Open", "position": 3}', b"playing"]] == [
        "on",
        "off",
        "open",
        "playing",
    ]
    assert [state_of(p) for p in [b"21.5", b"unavailable", b"{}", b"{broken", b"", b"x" * 65]] == [None] * 6


# Recording ------------------------------------------------------------------------------------------------------------


def test_state_changes_are_recorded_once_each_and_readings_and_retained_states_are_not(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    home = f"{prefix}/home"
    mqtt.publish(f"{home}/light/porch/state", "ON", retain=True)  # its state before we listen: not a change now
    start(supervisors, mqtt, {"batch_scheduler": scheduler(supervisors)})
    for topic, payload in [
        (f"{home}/light/porch/state", "ON"),  # the state it is in already
        (f"{home}/light/hall/state", "ON"),
        (f"{home}/light/hall/state", "ON"),  # a repeat, not a change
        (f"{home}/sensor/temperature/state", "21.5"),  # a reading, not a state
        (f"{home}/switch/coffee/state", json.dumps({"state": "OFF", "power": 3})),
        (f"{home}/light/hall/state", "off"),
        (f"{home}/light/porch/state", "OFF"),
    ]:
        mqtt.publish(topic, payload)
    expected = [("light.hall", "on"), ("switch.coffee", "off"), ("light.hall", "off"), ("light.porch", "off")]
    wait_until(lambda: recorded(supervisors) == expected, 10, f"the recorded changes to be {expected}")
    mqtt.publish(f"{home}/light/porch/state", "", retain=True)  # clear the retained state we left


# The analysis on demand -----------------------------------------------------------------------------------------------


def test_run_analysis_publishes_the_planted_suggestions_with_30_s_expiry_and_a_summary(
    supervisors: SupervisorFactory, mqtt: MqttProbe
) -> None:
    seed_history(supervisors)
    workers = {
        "batch_scheduler": scheduler(supervisors, use_ai=True, ai_timeout_seconds=25.0),
        "ai_analyzer": {"ai_enabled": False},  # replies at once, by its rules: proves the request and reply
    }
    start(supervisors, mqtt, workers)
    pressed = press(mqtt, supervisors)
    summary = wait_summary(mqtt, pressed)  # well before the 25 s AI timeout: the reply was used
    assert summary["trigger"] == "command"
    assert (summary["patterns_detected"], summary["suggestions_generated"]) == (2, 2)
    assert 0 <= summary["duration_seconds"] < 10
    events = mqtt.wait_for(SUGGESTIONS, count=2)
    found = {(e.json()["entity"], e.json()["time"][:2]) for e in events}
    assert found == {("light.hall", "07"), ("switch.coffee", "22")}
    for event in events:
        assert event.qos == 1
        assert event.expiry is not None and 25 <= event.expiry <= 30, f"MQTT 5 message expiry: {event.expiry}"
        body = event.json()
        assert set(body) >= {"id", "title", "entity", "time", "confidence"}
        assert 0.5 <= body["confidence"] <= 1
        assert body["title"].startswith(("Turn on light.hall at 0", "Turn off switch.coffee at 22:"))
    sensors = f"{supervisors.base}/batch_scheduler"
    mqtt.wait_for(f"{sensors}/suggestions", lambda m: m.text == "2")
    last_run = mqtt.wait_for(f"{sensors}/last_run")[-1].text
    assert abs(dt.datetime.fromisoformat(last_run).timestamp() - summary["started_ts"]) < 1
    status_of_worker(mqtt, supervisors, last_run_trigger="command", interval_seconds=86400.0)


def test_the_same_habits_keep_their_suggestion_ids_from_run_to_run(
    supervisors: SupervisorFactory, mqtt: MqttProbe
) -> None:
    seed_history(supervisors)
    start(supervisors, mqtt, {"batch_scheduler": scheduler(supervisors)})
    wait_summary(mqtt, press(mqtt, supervisors))
    wait_summary(mqtt, press(mqtt, supervisors))
    events = mqtt.wait_for(SUGGESTIONS, count=4)
    first, second = [{e.json()["id"] for e in events[n : n + 2]} for n in (0, 2)]
    assert first == second and len(first) == 2


# Scheduling -----------------------------------------------------------------------------------------------------------


def test_a_run_missed_while_down_is_caught_up_once_at_start(supervisors: SupervisorFactory, mqtt: MqttProbe) -> None:
    seed_history(supervisors)
    write_last_run(supervisors, "analysis", time.time() - 2 * 86400)  # before the last 03:30: missed
    started = time.time()
    start(supervisors, mqtt, {"batch_scheduler": scheduler(supervisors)})
    summary = wait_summary(mqtt, started)
    assert summary["trigger"] == "catch_up"
    worker = status_of_worker(mqtt, supervisors, last_run_trigger="catch_up")
    assert worker["last_run_ts"] == summary["started_ts"]
    state = json.loads((worker_dir(supervisors) / "jobs.json").read_text())
    assert state["analysis"]["last_run_ts"] == summary["started_ts"]
    # Caught up once: the next run is the schedule's next 03:30, and the next analysis is the one we ask for.
    assert [s["trigger"] for s in summaries(mqtt)] == ["catch_up"]
    assert wait_summary(mqtt, press(mqtt, supervisors))["trigger"] == "command"
    assert [s["trigger"] for s in summaries(mqtt)] == ["catch_up", "command"]


def test_no_catch_up_when_the_last_run_was_after_the_previous_fire_time(
    supervisors: SupervisorFactory, mqtt: MqttProbe
) -> None:
    cron, now = Cron.parse("30 3 * * *"), time.time()
    previous = cron.next_after(now - 86400, BERLIN)
    previous = previous if previous <= now else previous - 86400
    write_last_run(supervisors, "analysis", previous + 1)
    start(supervisors, mqtt, {"batch_scheduler": scheduler(supervisors)})
    status_of_worker(mqtt, supervisors, last_run_ts=previous + 1, last_run_trigger="interval")
    next_run = mqtt.wait_for(f"{supervisors.base}/batch_scheduler/next_run")[-1].text
    assert dt.datetime.fromisoformat(next_run).timestamp() == cron.next_after(now, BERLIN)
    # A catch-up would have started in on_start, before any command reached the worker.
    assert wait_summary(mqtt, press(mqtt, supervisors))["trigger"] == "command"
    assert [s["trigger"] for s in summaries(mqtt)] == ["command"]


def test_triggers_during_a_run_make_exactly_one_rerun_after_it(supervisors: SupervisorFactory, mqtt: MqttProbe) -> None:
    seed_history(supervisors)
    # No ai_analyzer runs: each run waits the whole AI timeout, so the presses below come during the first run.
    start(supervisors, mqtt, {"batch_scheduler": scheduler(supervisors, use_ai=True, ai_timeout_seconds=1.5)})
    pressed = press(mqtt, supervisors)
    press(mqtt, supervisors)
    press(mqtt, supervisors)
    mqtt.wait_for(SUMMARY, count=2, timeout=10)
    # A barrier: a press after both runs starts a run of its own; a second queued re-run would have come before it.
    barrier = press(mqtt, supervisors)
    wait_summary(mqtt, barrier)
    runs = summaries(mqtt)
    assert [r["trigger"] for r in runs] == ["command", "command", "command"]
    first, rerun, last = runs
    assert first["started_ts"] >= pressed
    finished = first["started_ts"] + first["duration_seconds"] - 0.0005  # the duration is rounded to the millisecond
    assert rerun["started_ts"] >= finished, "the re-run overlapped"
    assert rerun["started_ts"] < barrier <= last["started_ts"]
    assert all(r["phrased_by"] == "template" and r["duration_seconds"] >= 1.5 for r in runs)
