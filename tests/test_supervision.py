"""Restart policy with time driven by the test: backoff, its reset, restart intensity, restart types."""

from __future__ import annotations

import random

import pytest

from supervisor.config import WorkerSupervision
from supervisor.supervision import Decision, RestartTracker, Verdict


def tracker(**policy: object) -> RestartTracker:
    return RestartTracker(WorkerSupervision(**policy), random.Random(7))  # type: ignore[arg-type]


def test_first_restart_is_immediate_then_backoff_doubles_up_to_the_cap() -> None:
    t = tracker(backoff_min_seconds=0.5, backoff_max_seconds=4.0, max_restarts=100, restart_window_seconds=1.0)
    delays = []
    now = 0.0
    for _ in range(7):
        t.started(now)
        now += 0.1
        decision = t.exited(now, abnormal=True)
        assert decision.verdict is Verdict.RESTART
        delays.append(decision.delay)
        now += decision.delay + 10  # outside the intensity window, but never stable for 30 s
    assert delays[0] == 0.0
    for delay, base in zip(delays[1:], [0.5, 1.0, 2.0, 4.0, 4.0, 4.0], strict=True):
        assert base * 0.8 <= delay <= min(base * 1.2, 4.0)


def test_a_stable_run_resets_the_backoff() -> None:
    t = tracker(backoff_min_seconds=1.0, stable_after_seconds=30.0)
    t.started(0.0)
    assert t.exited(1.0, abnormal=True).delay == 0.0
    t.started(1.0)
    assert t.exited(2.0, abnormal=True).delay > 0.0
    t.started(100.0)
    assert t.exited(200.0, abnormal=True) == Decision(Verdict.RESTART, 0.0)


def test_more_than_max_restarts_in_the_window_fails_the_worker() -> None:
    t = tracker(max_restarts=3, restart_window_seconds=10.0)
    verdicts = [t.exited(float(i), abnormal=True).verdict for i in range(4)]
    assert verdicts == [Verdict.RESTART] * 3 + [Verdict.FAILED]


def test_restarts_outside_the_window_do_not_count() -> None:
    t = tracker(max_restarts=2, restart_window_seconds=10.0)
    verdicts = [t.exited(now, abnormal=True).verdict for now in (0.0, 5.0, 16.0, 22.0)]
    assert verdicts == [Verdict.RESTART] * 4


def test_a_significant_worker_escalates_instead_of_failing() -> None:
    t = tracker(max_restarts=1, significant=True)
    assert t.exited(0.0, abnormal=True).verdict is Verdict.RESTART
    assert t.exited(1.0, abnormal=True).verdict is Verdict.ESCALATE


@pytest.mark.parametrize(
    ("restart", "abnormal", "verdict"),
    [
        ("permanent", False, Verdict.RESTART),
        ("permanent", True, Verdict.RESTART),
        ("transient", False, Verdict.STAY_STOPPED),
        ("transient", True, Verdict.RESTART),
        ("temporary", True, Verdict.STAY_STOPPED),
    ],
)
def test_restart_types(restart: str, abnormal: bool, verdict: Verdict) -> None:
    assert tracker(restart=restart).exited(0.0, abnormal=abnormal).verdict is verdict


def test_reset_forgets_past_restarts() -> None:
    t = tracker(max_restarts=1)
    t.exited(0.0, abnormal=True)
    t.reset()
    assert t.exited(1.0, abnormal=True) == Decision(Verdict.RESTART, 0.0)
