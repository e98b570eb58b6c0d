"""The in-process harness for worker authors (`supervisor.testing`): a worker's hooks run as in its process, with
no broker and no processes, timers run when the test moves time, and what it does is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from testworkers.ticker import Ticker
from testworkers.typed import Typed

from contracts import Site
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
