"""Reloading the config on SIGHUP, `ctl reload` (a control request) and in watch mode: workers added, removed and
changed while the others, their messages and the MQTT connection stay as they are; a broken file changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SupervisorFactory, SupervisorProcess
from support import MqttProbe, free_port, process_gone, wait_until
from test_cli import run
from test_code_reload import LIVE, write
from test_health import scrape, value
from test_supervisor import echo, echoes, start, started_pids, wait_echo


def rewrite(supervisors: SupervisorFactory, process: SupervisorProcess, workers: dict[str, Any], **tables: Any) -> None:
    """Give the running supervisor's config file new contents (the factory's defaults, with `workers`)."""
    process.config_path.write_text(supervisors.config(workers, **tables).read_text())


def last_status(mqtt: MqttProbe, supervisors: SupervisorFactory) -> dict[str, Any]:
    return mqtt.received(f"{supervisors.base}/status")[-1].json()  # type: ignore[no-any-return]


def statuses(mqtt: MqttProbe, supervisors: SupervisorFactory) -> int:
    """How many status documents came so far: before a reload, what `wait_reloaded` looks after."""
    return len(mqtt.received(f"{supervisors.base}/status"))


def wait_reloaded(mqtt: MqttProbe, supervisors: SupervisorFactory, after: int, ok: bool = True) -> dict[str, Any]:
    """The first status document after the first `after` that reports a reload (`ok`, or refused)."""

    def reported() -> dict[str, Any] | None:
        for m in mqtt.received(f"{supervisors.base}/status")[after:]:
            if m.json().get("last_reload", {}).get("ok") is ok:
                return m.json()  # type: ignore[no-any-return]
        return None

    return wait_until(reported, 10, "a status reporting the reload")  # type: ignore[no-any-return]


def control(mqtt: MqttProbe, supervisors: SupervisorFactory, action: str, body: dict[str, Any]) -> dict[str, Any]:
    """A control request and its answer (on `<base>/response/<action>`, matched by its transaction)."""
    transaction = os.urandom(4).hex()
    mqtt.publish(f"{supervisors.base}/request/{action}", json.dumps({**body, "transaction": transaction}))
    answers = mqtt.wait_for(
        f"{supervisors.base}/response/{action}", lambda m: m.json().get("transaction") == transaction
    )
    return answers[0].json()  # type: ignore[no-any-return]


def send_in_background(mqtt: MqttProbe, topic: str, payloads: list[str]) -> threading.Thread:
    """Publish `payloads` at QoS 1 from a thread of their own, each waiting for its PUBACK."""

    def send() -> None:
        for payload in payloads:
            mqtt.publish(topic, payload, qos=1)

    sender = threading.Thread(target=send)
    sender.start()
    return sender


@pytest.mark.parametrize("protocol", [5, 311])
def test_sighup_adds_removes_and_changes_workers_while_an_untouched_one_loses_nothing_and_keeps_its_pid(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, protocol: int
) -> None:
    keep = echo(prefix, "keep", topics=[f"{prefix}/keep/#"], qos=1)
    gone = echo(prefix, "gone", topics=[f"{prefix}/gone/#"], qos=1)
    changing = echo(prefix, "changing", topics=[f"{prefix}/changing/#"], qos=1)
    tables = {"mqtt": {"protocol": protocol}}
    process = start(supervisors, mqtt, {"keep": keep, "gone": gone, "changing": changing}, tables)
    keep_pid = started_pids(mqtt, keep["out"])[0]
    changing_pid = started_pids(mqtt, changing["out"])[0]
    gone_pid = started_pids(mqtt, gone["out"])[0]
    mqtt.wait_for(f"{supervisors.base}/worker/gone/availability", lambda m: m.text == "online")

    stream = [f"m{i}" for i in range(400)]
    sender = send_in_background(mqtt, f"{prefix}/keep/x", stream)
    fresh = echo(prefix, "fresh", topics=[f"{prefix}/fresh/#"], qos=1)
    changed = {**changing, "topics": [f"{prefix}/changed/#"]}
    rewrite(supervisors, process, {"keep": keep, "changing": changed, "fresh": fresh}, **tables)
    mqtt.wait_for(f"{keep['out']}/echo", count=20)  # the reload lands mid-stream
    seen = statuses(mqtt, supervisors)
    process.signal(signal.SIGHUP)
    status = wait_reloaded(mqtt, supervisors, seen)
    sender.join(30)
    assert not sender.is_alive()

    reload = status["last_reload"]
    assert (reload["added"], reload["removed"], reload["changed"]) == (["fresh"], ["gone"], ["changing"])
    assert "restart_needed" not in reload
    # The untouched worker: every message of the stream, its one process throughout.
    wait_until(lambda: {e["payload"] for e in echoes(mqtt, keep["out"])} >= set(stream), 30, "the whole stream")
    assert started_pids(mqtt, keep["out"]) == [keep_pid]
    # The added one runs, the changed one runs again with its new section, the removed one is gone.
    mqtt.wait_for(f"{fresh['out']}/started")
    mqtt.publish(f"{prefix}/fresh/a", "to the new one")
    wait_echo(mqtt, fresh["out"], "to the new one")
    mqtt.wait_for(f"{changing['out']}/started", count=2)
    assert started_pids(mqtt, changing["out"])[1] != changing_pid
    mqtt.publish(f"{prefix}/changed/a", "on its new topic")
    wait_echo(mqtt, changing["out"], "on its new topic")
    mqtt.publish(f"{prefix}/changing/a", "on its old topic")
    wait_until(lambda: process_gone(gone_pid), 10, "the removed worker's process to end")
    mqtt.publish(f"{prefix}/gone/a", "to the removed one")
    mqtt.publish(f"{prefix}/keep/x", "last")  # the link handles messages in order: after it, nothing more comes
    wait_echo(mqtt, keep["out"], "last")
    assert echoes(mqtt, changing["out"], "on its old topic") == []
    assert echoes(mqtt, gone["out"], "to the removed one") == []
    mqtt.wait_for(f"{supervisors.base}/worker/gone/availability", lambda m: m.payload == b"")  # retained cleared
    process.wait_log("unsubscribed from")
    final = last_status(mqtt, supervisors)
    assert sorted(final["workers"]) == ["changing", "fresh", "keep"]
    assert final["workers"]["changing"]["restart_reasons"] == {"reload": 1}
    # One connection throughout: nothing reconnected.
    assert final["mqtt"]["reconnects"] == 0
    assert process.log().count("supervisor.mqtt: connected to") == 1


def test_an_invalid_config_on_reload_changes_nothing_and_says_why_until_a_valid_one_comes(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    worker = echo(prefix)
    port = free_port()
    process = start(supervisors, mqtt, {"echo": worker}, {"metrics": {"port": port}})
    pid = started_pids(mqtt, worker["out"])[0]
    rewrite(
        supervisors, process, {"echo": {**worker, "qos": "one"}, "other": echo(prefix, "other")}, metrics={"port": port}
    )
    seen = statuses(mqtt, supervisors)
    process.signal(signal.SIGHUP)
    status = wait_reloaded(mqtt, supervisors, seen, ok=False)
    error = status["last_reload"]["error"]
    assert "[workers.echo] qos" in error
    assert status["status"] == "degraded"
    assert any(p.startswith("the config was not reloaded (running on unchanged):") for p in status["problems"])
    process.wait_log("config reload (SIGHUP) refused, running on unchanged")
    # The control API says the same; nothing changed.
    answer = control(mqtt, supervisors, "reload", {})
    assert answer["ok"] is False
    assert answer["error"].startswith("the config was not reloaded:")
    assert "[workers.echo] qos" in answer["error"]
    assert sorted(last_status(mqtt, supervisors)["workers"]) == ["echo"]
    metrics = scrape(port)
    assert value(metrics, "supervisor_config_last_reload_successful") == 0
    assert value(metrics, "supervisor_config_reloads_total", result="error") == 2
    mqtt.publish(f"{prefix}/in/x", "still here")
    wait_echo(mqtt, worker["out"], "still here")
    assert started_pids(mqtt, worker["out"]) == [pid]
    # Fixed: reloaded, the problem gone.
    rewrite(supervisors, process, {"echo": worker}, metrics={"port": port})
    seen = statuses(mqtt, supervisors)
    answer = control(mqtt, supervisors, "reload", {})
    assert answer["ok"] is True
    assert (answer["added"], answer["removed"], answer["changed"]) == ([], [], [])
    status = wait_reloaded(mqtt, supervisors, seen)
    assert status["status"] == "ok", status["problems"]
    assert started_pids(mqtt, worker["out"]) == [pid]
    metrics = scrape(port)
    assert value(metrics, "supervisor_config_last_reload_successful") == 1
    assert value(metrics, "supervisor_config_reloads_total", result="ok") == 1


def test_a_key_that_cannot_change_live_is_named_and_waits_for_a_restart(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    worker = echo(prefix)
    process = start(supervisors, mqtt, {"echo": worker})
    pid = started_pids(mqtt, worker["out"])[0]
    rewrite(
        supervisors,
        process,
        {"echo": worker},
        mqtt={"keepalive_seconds": 45},
        supervisor={"status_interval_seconds": 30.0},
    )
    seen = statuses(mqtt, supervisors)
    answer = control(mqtt, supervisors, "reload", {})
    assert answer["ok"] is True
    assert answer["restart_needed"] == ["[mqtt] keepalive_seconds"]
    status = wait_reloaded(mqtt, supervisors, seen)
    assert "restart the supervisor to apply [mqtt] keepalive_seconds" in status["problems"]
    process.wait_log("restart the supervisor to apply [mqtt] keepalive_seconds (not applied live)")
    assert started_pids(mqtt, worker["out"]) == [pid]
    assert status["mqtt"]["reconnects"] == 0


def running_again_after_a_reload(mqtt: MqttProbe, supervisors: SupervisorFactory, worker: str) -> dict[str, Any]:
    """The status of `worker` once it runs again after one restart for a reload."""

    def again(m: Any) -> bool:
        status = m.json()["workers"][worker]
        return status["restart_reasons"] == {"reload": 1} and status["state"] == "running"  # type: ignore[no-any-return]

    return mqtt.wait_for(f"{supervisors.base}/status", again)[0].json()["workers"][worker]  # type: ignore[no-any-return]


def live_package(tmp_path: Path, supervisors: SupervisorFactory, version: str) -> Path:
    package = tmp_path / "livepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "live.py"
    write(module, LIVE.format(version=version))
    supervisors.python_path = [tmp_path]
    return module


def test_at_reload_a_changed_module_restarts_its_worker_with_its_new_subscriptions_and_a_broken_one_keeps_the_old(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, tmp_path: Path
) -> None:
    module = live_package(tmp_path, supervisors, "1")
    topic, out = f"{prefix}/in", f"{prefix}/out"
    mqtt.subscribe(f"{prefix}/#")
    process = supervisors.start({"live": {"topic": topic, "out": out}}, supervisor={"worker_packages": ["livepkg"]})
    mqtt.wait_for(f"{supervisors.base}/worker/live/availability", lambda m: m.text == "online")

    def answers() -> list[str]:
        return [m.text for m in mqtt.received(out)]

    mqtt.publish(topic, "which?")
    mqtt.wait_for(out)
    # A broken new version: the running one stays, and the reload says so.
    write(module, LIVE.format(version="2") + "\ndef half_written(:\n")
    seen = statuses(mqtt, supervisors)
    answer = control(mqtt, supervisors, "reload", {})
    assert answer["ok"] is True
    assert answer["changed"] == []
    assert list(answer["kept_modules"]) == ["livepkg.live"]
    assert "SyntaxError" in answer["kept_modules"]["livepkg.live"]
    status = wait_reloaded(mqtt, supervisors, seen)
    assert any(p.startswith("worker module livepkg.live: its new version was not loaded") for p in status["problems"])
    assert status["workers"]["live"]["state"] == "running"
    mqtt.publish(topic, "which?")
    wait_until(lambda: answers() == ["1", "1"], 10, "the old version to answer")
    # Fixed, and subscribing elsewhere: restarted with the new code, routed by its new subscriptions.
    write(
        module,
        LIVE.format(version="3").replace("Subscription(self.config.topic", "Subscription(self.config.topic + '/v3'"),
    )
    answer = control(mqtt, supervisors, "reload", {})
    assert answer["changed"] == ["live"]
    assert answer["kept_modules"] == {}
    running_again_after_a_reload(mqtt, supervisors, "live")
    mqtt.publish(f"{topic}/v3", "which?")
    wait_until(lambda: answers() == ["1", "1", "3"], 10, "the new version to answer on its new topic")
    mqtt.publish(topic, "not mine any more")
    mqtt.publish(f"{topic}/v3", "which?")
    wait_until(lambda: answers() == ["1", "1", "3", "3"], 10, "only the new topic to be answered")
    assert process.process.poll() is None


# A second worker for the live package: the live one under the name "half", answering "half".
HALF = LIVE.format(version="half").replace('name = "live"', 'name = "half"')


def test_a_section_whose_worker_cannot_be_loaded_fails_that_worker_only_until_a_reload_finds_it_fixed(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, tmp_path: Path
) -> None:
    module = live_package(tmp_path, supervisors, "1")
    half = module.parent / "half.py"
    write(half, HALF.replace("import msgspec", "import msgspec\nimport no_such_module_here"))
    topic, out = f"{prefix}/in", f"{prefix}/out"
    workers = {"live": {"topic": topic, "out": out}, "half": {"topic": f"{prefix}/half", "out": f"{prefix}/half/out"}}
    mqtt.subscribe(f"{prefix}/#")
    path = supervisors.config(workers, supervisor={"worker_packages": ["livepkg"]})
    # --check-config still fails on it, naming the module and the error.
    check = run("--config", str(path), "--check-config", python_path=(tmp_path,))
    assert check.returncode == 2
    assert "[workers.half]: its worker 'half' cannot be loaded:" in check.stderr
    assert "No module named 'no_such_module_here'" in check.stderr
    # Running, the other worker runs; this one is failed, and says why.
    port = free_port()
    process = supervisors.start(workers, supervisor={"worker_packages": ["livepkg"]}, metrics={"port": port})
    status = mqtt.wait_for(
        f"{supervisors.base}/status", lambda m: m.json()["workers"].get("live", {}).get("state") == "running"
    )[-1].json()
    assert status["status"] == "error"
    assert status["workers"]["half"]["state"] == "failed"
    assert "No module named 'no_such_module_here'" in status["workers"]["half"]["last_exit"]
    assert any(
        p.startswith("worker half cannot run:") and p.endswith("fix it, then reload") for p in status["problems"]
    )
    mqtt.publish(topic, "which?")
    mqtt.wait_for(out)
    answer = control(mqtt, supervisors, "restart", {"worker": "half"})
    assert answer["ok"] is False
    assert "cannot run" in answer["error"]
    assert value(scrape(port), "supervisor_worker_up", worker="half") == 0
    # Fixed: the next reload starts it; the other worker is untouched.
    write(half, HALF)
    process.config_path.write_text(
        supervisors.config(workers, supervisor={"worker_packages": ["livepkg"]}, metrics={"port": port}).read_text()
    )
    answer = control(mqtt, supervisors, "reload", {})
    assert answer["changed"] == ["half"]
    mqtt.wait_for(f"{supervisors.base}/worker/half/availability", lambda m: m.text == "online")
    mqtt.publish(f"{prefix}/half", "you?")
    assert mqtt.wait_for(f"{prefix}/half/out")[0].text == "half"
    assert last_status(mqtt, supervisors)["workers"]["live"]["restarts"] == 0
    assert process.process.poll() is None


def test_watch_mode_restarts_the_worker_whose_module_was_saved_and_only_it(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, tmp_path: Path
) -> None:
    module = live_package(tmp_path, supervisors, "1")
    topic, out = f"{prefix}/in", f"{prefix}/out"
    other = echo(prefix, "other", topics=[f"{prefix}/other/#"])
    mqtt.subscribe(f"{prefix}/#")
    process = supervisors.start(
        {"live": {"topic": topic, "out": out}, "other": other},
        supervisor={"worker_packages": ["livepkg", "testworkers"], "reload_on_change": True},
    )
    mqtt.wait_for(f"{other['out']}/started")
    mqtt.wait_for(f"{supervisors.base}/worker/live/availability", lambda m: m.text == "online")
    process.wait_log("watch mode: a saved change to")
    write(module, LIVE.format(version="2"))
    process.wait_log("config reloaded (watch mode: live.py changed): changed: live")
    running_again_after_a_reload(mqtt, supervisors, "live")
    mqtt.publish(topic, "which?")
    assert mqtt.wait_for(out)[0].text == "2"
    assert len(started_pids(mqtt, other["out"])) == 1
    # A saved config is taken too: here a new worker.
    rewrite(
        supervisors,
        process,
        {"live": {"topic": topic, "out": out}, "other": other, "more": echo(prefix, "more", topics=[f"{prefix}/more"])},
        supervisor={"worker_packages": ["livepkg", "testworkers"], "reload_on_change": True},
    )
    mqtt.wait_for(f"{prefix}/out/more/started")
    assert len(started_pids(mqtt, other["out"])) == 1


def test_worker_log_lines_and_the_supervisors_lines_about_it_go_to_its_log_topic(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    worker = echo(prefix)
    start(supervisors, mqtt, {"echo": worker})
    topic = f"{supervisors.base}/log/echo"
    mqtt.publish(f"{prefix}/in/x", "raise")
    line = mqtt.wait_for(topic)[0]
    assert not line.retain
    document = line.json()
    assert (document["worker"], document["level"], document["event_type"]) == ("echo", "ERROR", "error")
    assert document["logger"] == "workers.echo"
    assert document["message"].startswith("handling message")
    assert "RuntimeError" in document["message"]  # its traceback
    # What the supervisor says about the worker: its crash.
    pid = started_pids(mqtt, worker["out"])[0]
    os.kill(pid, signal.SIGKILL)
    crash = mqtt.wait_for(topic, lambda m: m.json()["logger"] == "supervisor")[0].json()
    assert crash["level"] == "WARNING"
    assert crash["message"].startswith("worker echo ended: killed by SIGKILL")


def run_ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run("--config", str(config), "ctl", *args)


def test_ctl_reload_and_ctl_tail_against_a_running_supervisor(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    worker = echo(prefix)
    process = start(supervisors, mqtt, {"echo": worker})
    rewrite(supervisors, process, {"echo": worker, "other": echo(prefix, "other")})
    done = run_ctl(process.config_path, "reload")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "reloaded\nadded: other\n"
    mqtt.wait_for(f"{prefix}/out/other/started")
    done = run_ctl(process.config_path, "reload")
    assert done.stdout == "reloaded: nothing changed\n"
    # A broken worker section: ctl still finds the supervisor (it reads only the connection), which refuses.
    rewrite(supervisors, process, {"echo": {**worker, "qos": "one"}})
    refused = run_ctl(process.config_path, "reload")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: the config was not reloaded: ")
    assert "[workers.echo] qos" in refused.stderr
    rewrite(supervisors, process, {"echo": worker, "other": echo(prefix, "other")})
    # tail: follows the worker's lines until --lines of them came.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    command = [sys.executable, "-m", "supervisor", "--config", str(process.config_path), "ctl", "tail", "echo"]
    tail = subprocess.Popen([*command, "--lines", "2"], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    assert tail.stdout is not None
    assert tail.stdout.readline().startswith(f"following {supervisors.base}/log/echo")
    mqtt.publish(f"{prefix}/in/x", "raise")
    first = tail.stdout.readline()
    assert " ERROR workers.echo: handling message " in first
    assert tail.wait(30) == 0
    unknown = run_ctl(process.config_path, "tail", "nobody")
    assert unknown.returncode == 1
    assert "no worker named 'nobody'; workers: echo, other" in unknown.stderr


def test_a_reload_that_changes_no_section_leaves_a_worker_stopped_by_command_stopped(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    worker = echo(prefix)
    process = start(supervisors, mqtt, {"echo": worker})
    assert control(mqtt, supervisors, "stop", {"worker": "echo"})["ok"] is True
    mqtt.wait_for(f"{supervisors.base}/status", lambda m: m.json()["workers"]["echo"]["state"] == "stopped")
    process.config_path.write_text(process.config_path.read_text() + "\n# a comment\n")
    seen = statuses(mqtt, supervisors)
    answer = control(mqtt, supervisors, "reload", {})
    assert (answer["added"], answer["removed"], answer["changed"]) == ([], [], [])
    status = wait_reloaded(mqtt, supervisors, seen)
    assert status["workers"]["echo"]["state"] == "stopped"  # a person stopped it; a reload leaves that alone


def test_a_syntax_error_in_a_module_no_section_uses_is_reported_and_stops_nothing(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, tmp_path: Path
) -> None:
    module = live_package(tmp_path, supervisors, "1")
    (module.parent / "junk.py").write_text('"""Half written."""\n\ndef on_message(:\n')
    topic, out = f"{prefix}/in", f"{prefix}/out"
    mqtt.subscribe(f"{prefix}/#")
    process = supervisors.start({"live": {"topic": topic, "out": out}}, supervisor={"worker_packages": ["livepkg"]})
    process.wait_log("skipped a worker module that cannot be used: ")
    assert f"{module.parent / 'junk.py'}: cannot import worker module: SyntaxError" in process.log()
    mqtt.wait_for(f"{supervisors.base}/worker/live/availability", lambda m: m.text == "online")
    mqtt.publish(topic, "which?")
    assert mqtt.wait_for(out)[0].text == "1"
    assert process.process.poll() is None


def test_a_section_removed_and_added_back_before_its_process_ended_runs_again(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    keep = echo(prefix, "keep", topics=[f"{prefix}/keep/#"], qos=1)
    back = echo(prefix, "back", topics=[f"{prefix}/back/#"], qos=1)
    process = start(supervisors, mqtt, {"keep": keep, "back": back})
    first = started_pids(mqtt, back["out"])[0]
    mqtt.publish(f"{prefix}/back/a", "sleep:2", qos=1)  # its process is busy when the removal comes
    wait_until(lambda: last_status(mqtt, supervisors)["workers"]["back"]["inflight"] == 1, 10, "the message in hand")
    rewrite(supervisors, process, {"keep": keep})
    assert control(mqtt, supervisors, "reload", {})["removed"] == ["back"]
    rewrite(supervisors, process, {"keep": keep, "back": back})
    assert control(mqtt, supervisors, "reload", {})["added"] == ["back"]
    pids = mqtt.wait_for(f"{back['out']}/started", count=2)
    assert int(pids[1].text) != first
    wait_echo(mqtt, back["out"], "sleep:2")  # finished before its process ended
    mqtt.publish(f"{prefix}/back/a", "after", qos=1)
    mqtt.publish(f"{prefix}/keep/a", "keep after", qos=1)
    wait_echo(mqtt, back["out"], "after")
    wait_echo(mqtt, keep["out"], "keep after")
    status = last_status(mqtt, supervisors)
    assert sorted(status["workers"]) == ["back", "keep"]
    assert "unexpected error" not in process.log()


def test_a_restart_for_a_reload_is_not_a_crash(supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str) -> None:
    worker = echo(prefix, topics=[f"{prefix}/in/#"])
    process = start(supervisors, mqtt, {"echo": worker})
    rewrite(supervisors, process, {"echo": {**worker, "topics": [f"{prefix}/other/#"]}})
    assert control(mqtt, supervisors, "reload", {})["changed"] == ["echo"]
    status = running_again_after_a_reload(mqtt, supervisors, "echo")
    assert status["last_exit"] == "exit code 0 (reload)"
    assert status["last_crash"] is None
    assert mqtt.received(f"{supervisors.base}/worker/echo/last_crash") == []


@pytest.mark.parametrize("protocol", [5, 311])
def test_a_worker_added_to_a_filter_others_have_gets_its_retained_messages_and_the_others_not_again(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, protocol: int
) -> None:
    retained = f"{prefix}/keep/r"
    mqtt.publish(retained, "retained once", qos=1, retain=True)
    keep = echo(prefix, "keep", topics=[f"{prefix}/keep/#"], qos=1)
    tables = {"mqtt": {"protocol": protocol}}
    process = start(supervisors, mqtt, {"keep": keep}, tables)
    try:
        wait_echo(mqtt, keep["out"], "retained once")
        same = echo(prefix, "same", topics=[f"{prefix}/keep/#"], qos=1)  # the very filter keep has
        wider = echo(prefix, "wider", topics=[f"{prefix}/+/r"], qos=1)  # a new filter over the same topic
        rewrite(supervisors, process, {"keep": keep, "same": same, "wider": wider}, **tables)
        assert control(mqtt, supervisors, "reload", {})["added"] == ["same", "wider"]
        wait_echo(mqtt, same["out"], "retained once")
        wait_echo(mqtt, wider["out"], "retained once")
        mqtt.publish(f"{prefix}/keep/x", "marker", qos=1)  # after the retained copies, from the same broker
        wait_echo(mqtt, keep["out"], "marker")
        assert len(echoes(mqtt, keep["out"], "retained once")) == 1
    finally:
        mqtt.publish(retained, "", qos=1, retain=True)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_module_changed_at_a_reload_runs_new_code_under_either_start_method(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, tmp_path: Path, method: str
) -> None:
    module = live_package(tmp_path, supervisors, "1")
    topic, out = f"{prefix}/in", f"{prefix}/out"
    mqtt.subscribe(f"{prefix}/#")
    supervisors.start(
        {"live": {"topic": topic, "out": out}}, supervisor={"worker_packages": ["livepkg"], "start_method": method}
    )
    mqtt.wait_for(f"{supervisors.base}/worker/live/availability", lambda m: m.text == "online")
    mqtt.publish(topic, "which?")
    mqtt.wait_for(out)
    write(module, LIVE.format(version="2"))
    assert control(mqtt, supervisors, "reload", {})["changed"] == ["live"]
    running_again_after_a_reload(mqtt, supervisors, "live")
    mqtt.publish(topic, "which?")
    wait_until(lambda: [m.text for m in mqtt.received(out)] == ["1", "2"], 10, "the new version to answer")


def test_under_3_1_1_a_wider_filter_taking_over_leaves_no_gap(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    keep = echo(prefix, "keep", topics=[f"{prefix}/a/b"], qos=1)
    tables = {"mqtt": {"protocol": 311}}
    process = start(supervisors, mqtt, {"keep": keep}, tables)
    wider = echo(prefix, "wider", topics=[f"{prefix}/a/#"], qos=1)
    rewrite(supervisors, process, {"keep": keep, "wider": wider}, **tables)
    stream = [f"m{i}" for i in range(300)]
    sender = send_in_background(mqtt, f"{prefix}/a/b", stream)
    mqtt.wait_for(f"{keep['out']}/echo", count=20)
    assert control(mqtt, supervisors, "reload", {})["added"] == ["wider"]
    sender.join(30)
    wait_until(lambda: {e["payload"] for e in echoes(mqtt, keep["out"])} >= set(stream), 30, "the whole stream")
    process.wait_log(f"unsubscribed from {prefix}/a/b")  # covered by the wider one now: sent once, after it
