"""The parts of a reload one at a time: what a plan applies and what it leaves for a restart, the router forgetting a
worker, and the bounds on log lines over MQTT."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from contracts import Logged, LogLine, Publish, Site
from supervisor import config, logrelay, registry, reloading
from supervisor.router import Router

SECTIONS = """
[workers.echo]
topics = ["in/#"]
out = "out/echo"

[workers.other]
worker = "echo"
topics = ["other/#"]
out = "out/other"
"""


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> config.Settings:
    path = tmp_path / "config.toml"
    path.write_text('[supervisor]\nworker_packages = ["testworkers"]\n' + text)
    return config.load(path, environ or {}, strict=False, reloading=True)


def test_an_unchanged_file_plans_nothing_and_keeps_the_running_settings(tmp_path: Path) -> None:
    running = load(tmp_path, SECTIONS)
    plan = reloading.plan(running, load(tmp_path, SECTIONS), {})
    assert plan.summary() == {"added": [], "removed": [], "changed": [], "restart_needed": []}
    assert all(a is b for a, b in zip(plan.settings.workers, running.workers, strict=True))


def test_a_plan_adds_removes_and_changes_by_section(tmp_path: Path) -> None:
    running = load(tmp_path, SECTIONS)
    edited = SECTIONS.replace('out = "out/other"', 'out = "out/other2"').replace("[workers.echo]", "[workers.new]")
    edited = edited.replace('topics = ["in/#"]', 'worker = "echo"\ntopics = ["in/#"]')
    plan = reloading.plan(running, load(tmp_path, edited), {})
    assert plan.summary() == {"added": ["new"], "removed": ["echo"], "changed": ["other"], "restart_needed": []}
    assert [w.name for w in plan.settings.workers] == ["new", "other"]


def test_keys_that_need_a_restart_are_named_and_keep_their_running_value(tmp_path: Path) -> None:
    running = load(tmp_path, SECTIONS)
    edited = (
        '[mqtt]\nhost = "broker.lan"\nclient_id = "other"\n[metrics]\nport = 9999\n'
        '[supervisor]\nstatus_interval_seconds = 5.0\nstart_method = "spawn"\n' + SECTIONS
    )
    path = tmp_path / "config.toml"
    path.write_text(edited.replace("[supervisor]\n", '[supervisor]\nworker_packages = ["testworkers"]\n', 1))
    plan = reloading.plan(running, config.load(path, {}, strict=False, reloading=True), {})
    assert plan.restart_needed == [
        "[metrics] port",
        "[mqtt] client_id",
        "[mqtt] host",
        "[supervisor] start_method",
    ]
    applied = plan.settings
    assert (applied.mqtt, applied.metrics) == (running.mqtt, running.metrics)
    assert applied.supervisor.start_method == running.supervisor.start_method
    assert applied.supervisor.status_interval_seconds == 5.0  # live


def test_a_secret_variable_first_named_at_a_reload_and_set_in_the_environment_waits_for_a_restart(
    tmp_path: Path,
) -> None:
    running = load(tmp_path, SECTIONS)
    edited = SECTIONS.replace('out = "out/echo"', 'out = "out/echo"\nsecret_env = "NEW_TOKEN"')
    new = load(tmp_path, edited, {"NEW_TOKEN": "s3cret"})
    plan = reloading.plan(running, new, {"NEW_TOKEN": "s3cret"})
    assert plan.restart_needed == ["the secret variable NEW_TOKEN"]
    assert plan.summary()["changed"] == ["echo"]
    assert reloading.plan(running, new, {}).restart_needed == []  # handed over at start: out of every environment


def test_a_section_naming_a_broken_module_is_a_worker_that_cannot_run(tmp_path: Path) -> None:
    package = tmp_path / "brokenpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "half.py").write_text("import no_such_module_anywhere\n")
    path = tmp_path / "config.toml"
    path.write_text('[supervisor]\nworker_packages = ["brokenpkg"]\n[workers.half]\n')
    sys.path.insert(0, str(tmp_path))
    try:
        settings = config.load(path, {}, strict=False)
    finally:
        sys.path.remove(str(tmp_path))
    (worker,) = settings.workers
    assert worker.worker_class is config.Unloadable
    assert worker.load_error is not None
    assert "[workers.half]: its worker 'half' cannot be loaded:" in worker.load_error
    assert "No module named 'no_such_module_anywhere'" in worker.load_error


def test_the_router_forgets_a_worker_and_the_others_keep_their_subscription_ids() -> None:
    router = Router()
    router.add("a", ["x/#"], qos=1)
    router.add("b", ["y/+"], qos=0, commands=True)
    router.add("c", ["y/+", "z"], qos=1)
    ids = {f: router.sub_id(f) for f in ("x/#", "y/+", "z")}
    router.remove("b")
    assert {f: router.sub_id(f) for f in ("x/#", "y/+", "z")} == ids
    assert router.workers("y/1") == ["c"]
    y_id = ids["y/+"]
    assert y_id is not None
    assert not router.is_command("c", y_id)
    router.remove("a")
    assert router.sub_id("x/#") is None
    assert router.workers("x/1") == []
    assert sorted(f for f, _, _ in router.broker_filters(with_ids=True)) == ["y/+", "z"]
    router.add("d", ["w"])
    assert router.sub_id("w") not in ids.values()  # a new filter never takes an id in use before


def line(message: str, level: int = logging.WARNING, time: float = 1_700_000_000.0) -> LogLine:
    return LogLine(time=time, level=level, logger="workers.w", message=message)


def test_log_lines_are_rate_limited_per_worker_and_what_is_left_out_is_counted() -> None:
    now = [0.0]
    sent: list[Publish] = []
    publisher = logrelay.LogPublisher(Site(base_topic="b"), "WARNING", sent.append, clock=lambda: now[0])
    publisher.lines("w", Logged(lines=[line(f"n{i}") for i in range(200)]))
    assert len(sent) == logrelay.BURST
    publisher.lines("other", Logged(lines=[line("its own budget")]))
    assert json.loads(sent[-1].payload)["worker"] == "other"
    now[0] = 1.0  # a second later: RATE more
    publisher.lines("w", Logged(lines=[line(f"later{i}") for i in range(50)], dropped=3))
    from_w = [json.loads(p.payload) for p in sent if p.topic == "b/log/w"]
    assert len(from_w) == logrelay.BURST + logrelay.RATE
    first_later = from_w[int(logrelay.BURST)]
    assert first_later["message"] == "later0"
    assert first_later["dropped"] == 200 - logrelay.BURST + 3  # left out here, and in the worker's process
    assert all(not p.retain and p.qos == 0 for p in sent)


def test_lines_below_the_level_are_not_published_and_off_publishes_none() -> None:
    sent: list[Publish] = []
    publisher = logrelay.LogPublisher(Site(base_topic="b"), "ERROR", sent.append)
    publisher.lines("w", Logged(lines=[line("a warning"), line("an error", logging.ERROR)]))
    assert [json.loads(p.payload)["message"] for p in sent] == ["an error"]
    publisher.set_level("OFF")
    publisher.lines("w", Logged(lines=[line("critical", logging.CRITICAL)]))
    assert len(sent) == 1


def test_the_relay_in_a_worker_keeps_at_most_its_bound_and_cuts_long_messages() -> None:
    relay = logrelay.Relay("WARNING")
    logger = logging.getLogger("test_reloading.relay")
    logger.addHandler(relay)
    logger.propagate = False
    try:
        for i in range(logrelay.MAX_PENDING + 25):
            logger.warning("line %d", i)
        logger.info("below its level")
        logger.error("x" * (logrelay.MAX_CHARS * 2))
    finally:
        logger.removeHandler(relay)
    logged = relay.take()
    assert logged is not None
    assert len(logged.lines) == logrelay.MAX_PENDING
    assert logged.dropped == 26
    assert logged.lines[0].message == "line 26"
    assert len(logged.lines[-1].message) == logrelay.MAX_CHARS
    assert relay.take() is None


def test_a_level_logging_has_no_name_for_and_a_wrong_time_are_published_as_they_can_be() -> None:
    sent: list[Publish] = []
    publisher = logrelay.LogPublisher(Site(base_topic="b"), "WARNING", sent.append)
    publisher.lines("w", Logged(lines=[line("custom", 45), line("when?", time=float("nan")), line("late", time=1e300)]))
    documents = [json.loads(p.payload) for p in sent]
    assert [(d["level"], d["event_type"]) for d in documents] == [
        ("Level 45", "level_45"),
        ("WARNING", "warning"),
        ("WARNING", "warning"),
    ]
    assert all(d["time"].endswith("+00:00") for d in documents)


def test_a_secret_of_a_disabled_section_handed_over_at_start_is_there_when_a_reload_enables_it(
    tmp_path: Path,
) -> None:
    disabled = SECTIONS.replace('out = "out/echo"', 'out = "out/echo"\nsecret_env = "TOKEN"\nenabled = false')
    running = load(tmp_path, disabled, {"TOKEN": "s3cret"})  # handed over at start: not in os.environ later
    assert running.workers[0].name == "other"
    assert "TOKEN" not in os.environ
    environ = dict(os.environ) | {name: secret.reveal() for name, secret in running.secrets.items()}
    new = load(tmp_path, disabled.replace("enabled = false", "enabled = true"), environ)
    plan = reloading.plan(running, new, os.environ)
    (added,) = plan.added
    assert {k: v.reveal() for k, v in added.environment.items()} == {"TOKEN": "s3cret"}
    assert plan.restart_needed == []


def test_a_module_that_imports_but_holds_no_valid_worker_is_imported_again_once_changed(tmp_path: Path) -> None:
    package = tmp_path / "stuckpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "w.py"
    source = (
        "import msgspec\nfrom contracts import Worker\n"
        "class C(msgspec.Struct, frozen=True, forbid_unknown_fields=True):\n    pass\n"
        'class W(Worker[C]):\n    name = "stuck_w"\n    Config = C\n'
    )
    module.write_text(source)  # no docstring: it imports, but is no valid worker
    sys.path.insert(0, str(tmp_path))
    try:
        broken: dict[str, str] = {}
        assert registry.discover(["stuckpkg"], broken) == {}
        assert "a worker needs a docstring" in broken["stuckpkg.w"]
        module.write_text(source.replace("class W(Worker[C]):", 'class W(Worker[C]):\n    """Fixed."""'))
        stat = module.stat()
        os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
        kept: dict[str, str] = {}
        assert list(registry.discover(["stuckpkg"], {}, kept)) == ["stuck_w"]
        assert kept == {}
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith("stuckpkg")]:
            del sys.modules[name]
