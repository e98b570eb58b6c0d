"""Liveness: the checks that kill a worker process which looks hung or uses too much memory.

A process stuck on one message past its `message_deadline_seconds`, or silent past its `heartbeat_timeout_seconds`
while idle (`WorkerSlot.overdue`), is looked at when the first such deadline of any worker can have passed, not on
a fixed tick: an idle supervisor wakes for this about once per heartbeat timeout. Every 10 s (every second while
one uses more than half of its limit), one whose resident memory passed its `memory_limit_mb` (inside a worker,
RLIMIT_DATA stops a fast allocation between two checks: see `supervisor.worker_process`). What a kill leads to is
the worker pool's: it restarts the worker by its policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from supervisor.loop import Loop, TimerHandle
from supervisor.slot import RestartReason, WorkerSlot

MEMORY_CHECK_SECONDS = 10.0  # on the multiples of 10 s, with the other periodic tasks and the heartbeats
NEAR_LIMIT_CHECK_SECONDS = 1.0  # while a worker uses more than half of its memory limit
_SLACK_SECONDS = 0.01  # past a deadline, so that the check finds it passed
# The check may run this long before its time in a wake-up that comes anyway: the heartbeat that moves an idle
# worker's deadline on arrives just before the deadline it replaces, and the check then needs no wake-up of its own.
_EARLY_SECONDS = 0.5

Kill = Callable[[WorkerSlot, RestartReason, str], None]  # (slot, reason, what it did), kills its process


class Liveness:
    """Looks at every worker's process on timers of the loop, and has `kill` end those that look hung."""

    def __init__(self, loop: Loop, slots: Mapping[str, WorkerSlot], kill: Kill) -> None:
        self.loop = loop
        self.slots = slots
        self.kill = kill
        self._timer: TimerHandle | None = None

    def start(self) -> None:
        self._check_liveness()
        self.loop.call_later(MEMORY_CHECK_SECONDS, self._check_memory, aligned=True)

    def started(self, slot: WorkerSlot) -> None:
        """A process of `slot` started: its heartbeat deadline may come before the next check."""
        due = slot.next_deadline(self.loop.clock())
        if self._timer is not None and due is not None and due + _SLACK_SECONDS < self._timer.when:
            self._timer.cancel()
            self._timer = self._call_at(due + _SLACK_SECONDS)

    def _check_liveness(self) -> None:
        now = self.loop.clock()
        for slot in list(self.slots.values()):
            verdict = slot.overdue(now)
            if verdict is not None:
                self.kill(slot, *verdict)
        deadlines = [d for d in (slot.next_deadline(now) for slot in self.slots.values()) if d is not None]
        when = max(min(deadlines, default=now + 60.0), now) + _SLACK_SECONDS
        self._timer = self._call_at(when)

    def _call_at(self, when: float) -> TimerHandle:
        return self.loop.call_at(when, self._check_liveness, earliest=when - _EARLY_SECONDS)

    def _check_memory(self) -> None:
        near = False
        for slot in list(self.slots.values()):
            limit = slot.settings.memory_limit_mb
            process = slot.process
            if limit is None or process is None or slot.kill_reason is not None:
                continue
            resident = process.resident_bytes()
            if resident > limit * 1024 * 1024:
                process.limit_reached = f"memory_limit_mb = {limit}"
                detail = f"uses {resident / 2**20:.0f} MiB, over memory_limit_mb = {limit}"
                self.kill(slot, RestartReason.MEMORY, detail)
            elif resident > limit * 1024 * 1024 / 2:
                near = True
        period = NEAR_LIMIT_CHECK_SECONDS if near else MEMORY_CHECK_SECONDS
        self.loop.call_later(period, self._check_memory, aligned=True)
