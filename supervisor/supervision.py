"""Restart policy: whether and when a worker that exited starts again, and when it has failed for good.

Pure logic over explicit timestamps (monotonic seconds), so tests drive time directly.
- `permanent` workers always restart, `transient` ones only after an abnormal exit, `temporary` ones never;
- the first restart after a stable run is immediate, then the delay doubles from `backoff_min_seconds` up to
  `backoff_max_seconds`, with +-20% jitter; a run that lasts `stable_after_seconds` resets it;
- more than `max_restarts` restarts within `restart_window_seconds` mark the worker failed, or, when it is
  `significant`, stop the supervisor.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from enum import Enum

from supervisor.config import WorkerSupervision


class Verdict(Enum):
    RESTART = "restart"
    STAY_STOPPED = "stay_stopped"
    FAILED = "failed"
    ESCALATE = "escalate"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    delay: float = 0.0


class RestartTracker:
    """Decides what happens after each exit of one worker."""

    def __init__(self, policy: WorkerSupervision, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rng = rng or random.Random()
        self._restarts: deque[float] = deque()
        self._consecutive = 0
        self._started_at: float | None = None

    def started(self, now: float) -> None:
        """The worker is up (its `on_start` returned) at `now`."""
        self._started_at = now

    def exited(self, now: float, abnormal: bool) -> Decision:
        """The worker exited at `now`; `abnormal` is any exit the worker did not ask for with status 0."""
        policy = self.policy
        if policy.restart == "temporary" or (policy.restart == "transient" and not abnormal):
            return Decision(Verdict.STAY_STOPPED)
        if self._started_at is not None and now - self._started_at >= policy.stable_after_seconds:
            self._consecutive = 0
        self._started_at = None
        while self._restarts and now - self._restarts[0] > policy.restart_window_seconds:
            self._restarts.popleft()
        if len(self._restarts) >= policy.max_restarts:
            return Decision(Verdict.ESCALATE if policy.significant else Verdict.FAILED)
        self._restarts.append(now)
        delay = self.backoff(self._consecutive)
        self._consecutive += 1
        return Decision(Verdict.RESTART, delay)

    def backoff(self, consecutive: int) -> float:
        """The delay before restart number `consecutive` (0-based) since the last stable run."""
        if consecutive == 0:
            return 0.0
        base = min(self.policy.backoff_min_seconds * 2 ** (consecutive - 1), self.policy.backoff_max_seconds)
        jittered: float = base * self._rng.uniform(0.8, 1.2)
        return min(jittered, self.policy.backoff_max_seconds)

    def reset(self) -> None:
        """Forget past restarts (a person restarted the worker by command)."""
        self._restarts.clear()
        self._consecutive = 0
