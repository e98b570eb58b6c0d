"""Health surfaces: the Prometheus endpoint, the retained status, per-worker availability, the control API, systemd."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import SupervisorFactory
from prometheus_client.parser import text_string_to_metric_families
from support import Broker, MqttProbe, free_port, wait_until
from test_supervisor import echo, retained, start, started_pids, wait_echo

from supervisor.slot import ErrorKind, RestartReason

ROOT = Path(__file__).resolve().parent.parent
SPEC_METRICS = {
    "supervisor_worker_errors_total": {"worker", "kind"},
    "supervisor_worker_restarts_total": {"worker", "reason"},
    "supervisor_worker_up": {"worker"},
    "supervisor_worker_queue_depth": {"worker"},
    "supervisor_worker_inflight_messages": {"worker"},
    "supervisor_message_handling_seconds_bucket": {"worker", "le"},
    "supervisor_dead_letters_total": {"worker"},
    "supervisor_worker_resident_memory_bytes": {"worker"},
    "supervisor_worker_cpu_seconds_total": {"worker"},
    "supervisor_mqtt_connected": set(),
    "supervisor_mqtt_reconnects_total": set(),
    "supervisor_mqtt_messages_received_total": set(),
    "supervisor_mqtt_messages_published_total": set(),
    "supervisor_mqtt_publish_errors_total": set(),
    "supervisor_outbox_messages": set(),
    "supervisor_build_info": {"version", "host"},
}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        body: bytes = response.read()  # urlopen's response is typed Any
        return body.decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def scrape_until(port: int, name: str, expected: float, **labels: str) -> str:
    """Scrape until `name{labels}` has the value `expected`; returns that scrape."""

    def attempt() -> str | None:
        try:
            text = scrape(port)
        except OSError:  # not serving yet
            return None
        return text if value(text, name, **labels) == expected else None

    result: str = wait_until(attempt, 5, f"{name}{labels} == {expected}")
    return result


def test_every_spec_metric_is_served_with_live_values(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    port = free_port()
    start(
        supervisors,
        mqtt,
        {"echo": echo(prefix), "idle": echo(prefix, "idle", [f"{prefix}/nothing"])},
        {"metrics": {"port": port}},
    )
    mqtt.publish(f"{prefix}/in/x", "raise")
    mqtt.publish(f"{prefix}/in/x", "hello")
    wait_echo(mqtt, f"{prefix}/out/echo", "hello")
    text = scrape_until(port, "supervisor_worker_errors_total", 1, worker="echo", kind="handler")
    found = {name: set(labels) for name, labels in ((n, dict(ls)) for n, ls in samples(text))}
    for name, labels in SPEC_METRICS.items():
        assert name in found, name
        assert set(found[name]) == labels, (name, found[name])
    assert value(text, "supervisor_worker_up", worker="echo") == 1
    assert value(text, "supervisor_worker_errors_total", worker="idle", kind="handler") == 0  # pre-initialised
    assert value(text, "supervisor_worker_restarts_total", worker="idle", reason="killed") == 0
    kinds = {dict(labels)["kind"] for name, labels in samples(text) if name == "supervisor_worker_errors_total"}
    reasons = {dict(labels)["reason"] for name, labels in samples(text) if name == "supervisor_worker_restarts_total"}
    assert kinds == {kind.value for kind in ErrorKind}  # every one, "stop" too, before the first happens
    assert reasons == {reason.value for reason in RestartReason}  # "normal" too
    assert value(text, "supervisor_mqtt_connected") == 1
    assert value(text, "supervisor_message_handling_seconds_count", worker="echo") >= 2
    assert value(text, "supervisor_worker_resident_memory_bytes", worker="echo") > 1_000_000
    assert value(text, "supervisor_build_info", version="0.1.0", host=socket.gethostname()) == 1
    assert not any(name.endswith("_created") for name, _ in samples(text))


def test_a_workers_own_error_kinds_are_served_at_zero_from_the_start(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    port = free_port()
    workers = {"ai_analyzer": {"ai_enabled": False}}
    supervisors.start(workers, metrics={"port": port}, supervisor={"worker_packages": ["workers"]})
    text = scrape_until(port, "supervisor_worker_up", 1, worker="ai_analyzer")
    assert value(text, "supervisor_worker_errors_total", worker="ai_analyzer", kind="ai") == 0


def test_promtool_accepts_the_metrics(supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: in CI `make test` installs Debian's prometheus package for it")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    port = free_port()
    start(supervisors, mqtt, {"echo": echo(prefix)}, {"metrics": {"port": port}})
    result = subprocess.run(
        [promtool, "check", "metrics"], input=scrape(port), capture_output=True, text=True, check=False, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_follow_a_worker_kill_and_restart(supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str) -> None:
    port = free_port()
    start(supervisors, mqtt, {"echo": echo(prefix)}, {"metrics": {"port": port}})
    os.kill(started_pids(mqtt, f"{prefix}/out/echo")[0], signal.SIGKILL)
    mqtt.wait_for(f"{prefix}/out/echo/started", count=2)
    text = scrape_until(port, "supervisor_worker_up", 1, worker="echo")
    assert value(text, "supervisor_worker_restarts_total", worker="echo", reason="killed") == 1


def test_the_metrics_endpoint_answers_404_elsewhere(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    port = free_port()
    start(supervisors, mqtt, {"echo": echo(prefix)}, {"metrics": {"port": port}})
    with pytest.raises(urllib.error.HTTPError, match=r"^HTTP Error 404: Not Found$"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:  # a silent client blocks nothing
        assert re.search(r"^supervisor_mqtt_connected 1\.0$", scrape(port), re.M)
        del idle


# Retained status and availability -----------------------------------------------------------------------------------


def test_the_retained_status_and_availability_follow_a_worker_kill(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix)})
    status_topic, availability = f"{supervisors.base}/status", f"{supervisors.base}/worker/echo/availability"
    first = mqtt.wait_for(status_topic, lambda m: m.json()["workers"]["echo"]["state"] == "running")[0].json()
    assert first["status"] == "ok" and first["sw_version"] == "0.1.0" and first["mqtt"]["connected"] is True
    assert set(first) >= {
        "last_updated",
        "uptime_seconds",
        "scrape_error_count",
        "ai_error_count",
        "publish_error_count",
    }
    pid = started_pids(mqtt, f"{prefix}/out/echo")[0]
    assert first["workers"]["echo"]["pid"] == pid
    mqtt.wait_for(availability, lambda m: m.text == "online")
    os.kill(pid, signal.SIGKILL)
    mqtt.wait_for(availability, lambda m: m.text == "offline")
    mqtt.wait_for(availability, lambda m: m.text == "online", count=2)
    after = mqtt.wait_for(status_topic, lambda m: m.json()["workers"]["echo"]["restarts"] == 1)[-1].json()
    worker = after["workers"]["echo"]
    assert worker["restart_reasons"] == {"killed": 1} and worker["last_exit"] == "killed by SIGKILL (killed)"
    assert worker["last_exit_time"].startswith(after["last_updated"][:10])


def test_a_crash_restarted_at_once_is_still_seen_in_the_status(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    # Restarted with no backoff, the worker runs again within milliseconds: a status document published only at the
    # once-a-second check would never show it down, and Home Assistant's "Running" would never go off.
    start(supervisors, mqtt, {"echo": echo(prefix, backoff_min_seconds=0.001, backoff_max_seconds=0.001)})
    status_topic = f"{supervisors.base}/status"
    mqtt.wait_for(status_topic, lambda m: m.json()["workers"]["echo"]["state"] == "running")
    os.kill(started_pids(mqtt, f"{prefix}/out/echo")[0], signal.SIGKILL)
    mqtt.wait_for(f"{prefix}/out/echo/started", count=2)

    def after_the_kill() -> list[dict[str, Any]]:
        documents = [m.json()["workers"]["echo"] for m in mqtt.received(status_topic)]
        return [w for w in documents if w["restarts"] == 1]

    wait_until(lambda: any(w["state"] == "running" for w in after_the_kill()), 10, "the worker running again")
    first = after_the_kill()[0]
    assert first["state"] != "running"  # the first document that counts the restart shows the worker down
    assert first["last_crash"] == "killed by SIGKILL (killed)" and first["last_crash_time"] == first["last_exit_time"]


def test_a_restart_asked_for_is_no_crash(supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix)})
    mqtt.publish(f"{supervisors.base}/cmd/echo/restart", "PRESS")
    status = mqtt.wait_for(f"{supervisors.base}/status", lambda m: m.json()["workers"]["echo"]["restarts"] == 1)
    worker = status[-1].json()["workers"]["echo"]
    assert worker["last_exit"].endswith("(command)") and worker["last_crash"] is None


def test_a_clean_stop_leaves_every_worker_offline(
    supervisors: SupervisorFactory, mqtt: MqttProbe, broker: Broker, prefix: str
) -> None:
    process = start(supervisors, mqtt, {"echo": echo(prefix)})
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    assert retained(broker, f"{supervisors.base}/worker/echo/availability") == "offline"
    assert retained(broker, f"{supervisors.base}/availability") == "offline"
    status = json.loads(retained(broker, f"{supervisors.base}/status"))
    assert (status["status"], status["mqtt"]["connected"], status["problems"]) == ("stopped", False, [])
    assert status["workers"]["echo"]["state"] == "stopped"


def test_the_status_is_degraded_while_a_workers_every_recent_message_fails_and_ok_again_after(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix)})
    status_topic = f"{supervisors.base}/status"
    mqtt.wait_for(status_topic, lambda m: m.json()["status"] == "ok")
    for _ in range(3):
        mqtt.publish(f"{prefix}/in/x", "raise")
    failing = ["worker echo: its last 3 messages or runs failed"]
    degraded = mqtt.wait_for(status_topic, lambda m: m.json()["problems"] == failing)[-1].json()
    assert degraded["status"] == "degraded"
    mqtt.publish(f"{prefix}/in/x", "fine")
    wait_echo(mqtt, f"{prefix}/out/echo", "fine")
    mqtt.publish(f"{supervisors.base}/request/status", "")
    (reply,) = mqtt.wait_for(f"{supervisors.base}/response/status")
    assert (reply.json()["status"]["status"], reply.json()["status"]["problems"]) == ("ok", [])


def test_each_worker_carries_only_the_status_fields_that_apply_to_it(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(
        supervisors,
        mqtt,
        {"echo": echo(prefix), "deduplicating": echo(prefix, "deduplicating", dedupe_seconds=60)},
    )
    running_both = lambda m: {w["state"] for w in m.json()["workers"].values()} == {"running"}  # noqa: E731
    status = mqtt.wait_for(f"{supervisors.base}/status", running_both)[-1].json()
    echo_fields, dedupe_fields = set(status["workers"]["echo"]), set(status["workers"]["deduplicating"])
    assert dedupe_fields - echo_fields == {"duplicates"}
    assert not echo_fields & {"last_run_ts", "last_run_iso", "ai_enabled", "ai_model", "event_count", "duplicates"}


# The control API ----------------------------------------------------------------------------------------------------


def test_restart_request_replies_on_the_response_topic_with_the_correlation_data(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix)})
    mqtt.publish(
        f"{supervisors.base}/request/restart",
        '{"worker": "echo"}',
        response_topic=f"{prefix}/reply",
        correlation_data=b"req-1",
    )
    (reply,) = mqtt.wait_for(f"{prefix}/reply")
    assert reply.json() == {"ok": True, "worker": "echo", "state": "restarting"}
    assert reply.correlation_data == b"req-1"
    mqtt.wait_for(f"{prefix}/out/echo/started", count=2)
    status = mqtt.wait_for(f"{supervisors.base}/status", lambda m: m.json()["workers"]["echo"]["restarts"] == 1)
    assert status[-1].json()["workers"]["echo"]["restart_reasons"] == {"command": 1}


def test_status_request_without_a_response_topic_replies_on_the_response_topic_of_the_action(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix)})
    mqtt.publish(f"{supervisors.base}/request/status", "")
    (reply,) = mqtt.wait_for(f"{supervisors.base}/response/status")
    assert reply.json()["ok"] is True
    assert reply.json()["status"]["workers"]["echo"]["state"] == "running"


@pytest.mark.parametrize(
    ("action", "payload", "error"),
    [
        ("restart", '{"worker": "nope"}', "no worker named 'nope'; workers: echo"),
        ("restart", "not json", 'expected JSON like {"worker": "<name>"}, got'),
        ("stop", '["echo"]', 'expected {"worker": "<name>"}, got'),
        ("reboot", "{}", "unknown action 'reboot'; expected one of: reload, republish, restart, start, status, stop"),
        ("start", '{"worker": "echo"}', "worker echo is already running (pid "),
    ],
)
def test_a_bad_request_gets_an_error_reply(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, action: str, payload: str, error: str
) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix)})
    mqtt.publish(f"{supervisors.base}/request/{action}", payload)
    (reply,) = mqtt.wait_for(f"{supervisors.base}/response/{action}")
    assert reply.json()["ok"] is False
    assert reply.json()["error"].startswith(error)


def test_stop_keeps_a_worker_down_until_start(supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str) -> None:
    start(supervisors, mqtt, {"echo": echo(prefix)})
    availability = f"{supervisors.base}/worker/echo/availability"
    mqtt.publish(f"{supervisors.base}/request/stop", '{"worker": "echo"}')
    assert mqtt.wait_for(f"{supervisors.base}/response/stop")[0].json()["state"] == "stopping"
    mqtt.wait_for(availability, lambda m: m.text == "offline")
    mqtt.wait_for(f"{supervisors.base}/status", lambda m: m.json()["workers"]["echo"]["state"] == "stopped")
    mqtt.publish(f"{prefix}/in/x", "while stopped")
    mqtt.publish(f"{supervisors.base}/request/start", '{"worker": "echo"}')
    assert mqtt.wait_for(f"{supervisors.base}/response/start")[0].json()["state"] == "starting"
    mqtt.wait_for(availability, lambda m: m.text == "online", count=2)
    mqtt.publish(f"{prefix}/in/x", "after start")
    wait_echo(mqtt, f"{prefix}/out/echo", "after start")
    assert [r.json()["payload"] for r in mqtt.received(f"{prefix}/out/echo/echo")] == ["after start"]


def test_the_restart_button_restarts_and_a_retained_press_is_ignored(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    mqtt.publish(f"{supervisors.base}/cmd/echo/restart", "PRESS", retain=True)  # a stale press
    process = start(supervisors, mqtt, {"echo": echo(prefix)})
    process.wait_log("a retained message on a command topic")
    mqtt.publish(f"{supervisors.base}/cmd/echo/restart", "", retain=True)  # clear it: an empty message, no press
    process.wait_log("ignored an empty message on command topic")
    assert len(started_pids(mqtt, f"{prefix}/out/echo")) == 1
    mqtt.publish(f"{supervisors.base}/cmd/echo/restart", "PRESS")
    mqtt.wait_for(f"{prefix}/out/echo/started", count=2)


def test_a_failed_worker_is_restarted_by_command(supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str) -> None:
    mqtt.subscribe(f"{prefix}/#")
    process = supervisors.start({"broken_start": {"max_restarts": 1, "backoff_min_seconds": 0.05}})
    mqtt.wait_for(f"{supervisors.base}/status", lambda m: m.json()["workers"]["broken_start"]["state"] == "failed")
    assert mqtt.received(f"{supervisors.base}/status")[-1].json()["status"] == "error"
    mqtt.publish(f"{supervisors.base}/request/restart", '{"worker": "broken_start"}')
    assert mqtt.wait_for(f"{supervisors.base}/response/restart")[0].json()["state"] == "starting"
    process.wait_log("worker broken_start failed", count=2)  # it fails again, after a fresh series of restarts
    assert process.log().count("worker broken_start starting") == 4


# systemd ------------------------------------------------------------------------------------------------------------


def test_systemd_hears_ready_watchdog_and_stopping(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, tmp_path: Path
) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(10)
    try:
        process = supervisors.start(
            {"echo": echo(prefix)},
            environment={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"},
        )

        def receive() -> str:
            return listener.recv(4096).decode()

        first, early = receive(), 0
        while first == "WATCHDOG=1" and early < 20:  # pings start with the loop, maybe before the broker answers
            first, early = receive(), early + 1
        assert first.startswith("READY=1\nSTATUS=connected to 127.0.0.1:")
        assert [receive(), receive()] == ["WATCHDOG=1", "WATCHDOG=1"]
        process.signal(signal.SIGTERM)
        while (message := listener.recv(4096).decode()) == "WATCHDOG=1":
            pass
        assert message == "STOPPING=1\nSTATUS=stopping"
        assert process.wait() == 0
    finally:
        listener.close()


def test_an_abstract_notify_socket_is_understood() -> None:
    from supervisor.systemd import Notifier

    name = f"@supervisor-test-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name[1:])
    listener.settimeout(5)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "2000000"})
        notifier.status("hello")
        assert listener.recv(100) == b"STATUS=hello"
        assert notifier.watchdog_seconds == 2.0
        notifier.close()
    finally:
        listener.close()


def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET `path`, with a real HTTP client."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def get_when_served(port: int, path: str) -> tuple[int, str, str] | None:
    try:
        return get(port, path)
    except urllib.error.URLError:  # not listening yet
        return None


def test_healthz_answers_200_while_healthy(supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str) -> None:
    port = free_port()
    start(supervisors, mqtt, {"echo": echo(prefix)}, {"metrics": {"port": port}})
    healthy = wait_until(lambda: (r := get(port, "/healthz"))[0] == 200 and r, 10, "a healthy answer")
    assert healthy == (200, "text/plain", "ok\n")


def test_healthz_answers_503_with_the_reason_in_one_line_while_a_worker_has_failed(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    port = free_port()
    mqtt.subscribe(f"{prefix}/#")
    supervisors.start({"broken_start": {"max_restarts": 0}}, metrics={"port": port})
    failed = lambda: (r := get_when_served(port, "/healthz")) is not None and "failed" in r[2] and r  # noqa: E731
    status, content_type, body = wait_until(failed, 15, "an answer naming the failed worker")
    assert (status, content_type, body.count("\n")) == (503, "text/plain", 1)
    assert body.startswith("error: ")  # (the broker may not have been reached yet, a problem of its own)
    assert "worker broken_start has failed (last: exit code 1 (start_failed)); restart it by command" in body


def test_the_status_page_shows_every_worker_in_plain_html(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    port = free_port()
    start(supervisors, mqtt, {"echo": echo(prefix), "other": echo(prefix, "other")}, {"metrics": {"port": port}})
    status, content_type, body = get(port, "/")
    assert (status, content_type) == (200, "text/html; charset=utf-8")
    assert body.startswith("<!doctype html>") and "<script" not in body and "http" not in body.replace("http-equiv", "")
    for name in ("echo", "other"):
        assert f"<tr><td>{name}</td><td class='running'>running</td>" in body
    assert "MQTT connected" in body
