"""The in-process harness for worker authors (`supervisor.testing`): a worker's hooks run as in its process, with
no broker and no processes, timers run when the test moves time, and what it does is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from testworkers.ticker import Ticker
from testworkers.typed import Typed

from contracts import Message, Site, Subscription
from contracts.handling import Handlers
from supervisor.testing import WorkerHarness
from workers.ai_analyzer import AiAnalyzer


def test_messages_go_through_the_typed_handlers_and_the_failure_policy(tmp_path: Path) -> None:
    typed = WorkerHarness(Typed, {"prefix": "in", "out": "out"}, tmp_path)
    typed.start()
    assert typed.receive("in/reading", json.dumps({"sensor": "kitchen", "value": 21.5}))
    assert not typed.receive("in/reading", "{not json")  # counted, as in a worker process
    assert typed.receive("in/later", json.dumps({"sensor": "attic", "value": 7}))  # subscribed in on_start
    assert typed.receive("in/else", "plain")
    assert [json.loads(p) for p in typed.published_to("out/reading")] == [
        {"sensor": "kitchen", "value": 21.5, "topic": "in/reading"},
        {"sensor": "attic", "value": 7.0, "topic": "in/later"},
    ]
    assert typed.published_to("out/on_message") == [b'{"topic":"in/else","payload":"plain"}']
    assert [kind for kind, _ in typed.errors] == ["decode"]
    assert typed.status.fields == {"readings": 2} and typed.subscribed == [("in/later", 0)]
    with pytest.raises(LookupError, match=r"^typed does not subscribe to 'elsewhere'"):
        typed.receive("elsewhere", "x")
    typed.stop()


def test_timers_run_only_when_the_test_moves_time(tmp_path: Path) -> None:
    ticker = WorkerHarness(Ticker, {"out": "t", "interval_seconds": 10, "count": 3}, tmp_path)
    ticker.start()
    ticker.advance(9.9)
    assert ticker.published_to("t/tick") == []
    ticker.advance(0.1)
    assert ticker.published_to("t/tick") == [b"0"]
    ticker.advance(100)  # three ticks in all, then it cancels its timer
    assert ticker.published_to("t/tick") == [b"0", b"1", b"2"]


def test_a_shipped_worker_with_its_entities_buttons_and_threads(tmp_path: Path) -> None:
    # The model is off: the rules answer, through the same request/reply protocol as with a model.
    site = Site(base_topic="home/sup", node_id="box")
    analyzer = WorkerHarness(AiAnalyzer, {"ai_enabled": False}, tmp_path, site)
    analyzer.start()
    assert {e["default_entity_id"] for e in analyzer.entities} >= {"button.box_ai_analyzer_clear_cache"}
    request = {"id": "r1", "task": "shorten", "items": ["Riverside FC - Harbour City"], "reply_to": "home/sup/x"}
    assert analyzer.receive("home/sup/ai/request", json.dumps(request), qos=1)
    analyzer.finish_threads()
    (reply,) = [msgspec.json.decode(p) for p in analyzer.published_to("home/sup/x")]
    assert reply["id"] == "r1" and reply["fallback"] is True and len(reply["results"]) == 1
    assert analyzer.press("clear_cache")
    analyzer.stop()
    assert analyzer.errors == []


def test_the_harness_names_devices_applies_the_command_rules_and_takes_a_whole_section(tmp_path: Path) -> None:
    site = Site(base_topic="home/sup", node_id="box")
    # Supervision keys in the section are the supervisor's, as in the config file.
    analyzer = WorkerHarness(AiAnalyzer, {"ai_enabled": False, "restart": "permanent"}, tmp_path, site)
    analyzer.start()
    assert {e["device"]["name"] for e in analyzer.entities} == {"AI analyzer on localhost"}
    assert not analyzer.press("clear_cache", "") or analyzer.errors == []  # an empty press is ignored
    assert not analyzer.receive(analyzer.ctx.command_topic("clear_cache"), "PRESS", retain=True)
    assert [kind for kind, _ in analyzer.errors] == ["retained_command"]


def test_an_exact_filter_takes_its_topic_from_a_wildcard_declared_first() -> None:
    got: list[tuple[str, object]] = []
    handlers = Handlers()
    handlers.add(Subscription("home/#", handler=lambda ctx, value, message: got.append(("wildcard", value))))
    handlers.add(
        Subscription("home/reply", handler=lambda ctx, value, message: got.append(("exact", value)), type=dict)
    )
    assert handlers.dispatch(None, Message(id=1, topic="home/reply", payload=b'{"a": 1}'))  # type: ignore[arg-type]
    assert handlers.dispatch(None, Message(id=2, topic="home/other", payload=b"x"))  # type: ignore[arg-type]
    assert got == [("exact", {"a": 1}), ("wildcard", b"x")]


def test_typed_json_has_no_size_limit_of_its_own() -> None:
    # What reaches a worker is bounded by the supervisor ([mqtt] max_payload_bytes from the broker).
    got: list[object] = []
    handlers = Handlers()
    handlers.add(Subscription("big", handler=lambda ctx, value, message: got.append(len(value)), type=list))
    payload = b"[" + b",".join([b"1"] * 1_000_000) + b"]"  # 2 MB
    assert handlers.dispatch(None, Message(id=1, topic="big", payload=payload))  # type: ignore[arg-type]
    assert got == [1_000_000]


def test_a_trigger_outside_the_list_is_refused_where_it_is_reported(tmp_path: Path) -> None:
    ticker = WorkerHarness(Ticker, {"out": "t"}, tmp_path)
    with pytest.raises(ValueError, match=r"^report_status\(\): expected last_run_trigger in startup, interval, "):
        ticker.ctx.report_status(last_run_trigger="manual")  # type: ignore[arg-type]
