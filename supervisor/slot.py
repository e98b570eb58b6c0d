"""One worker as the supervisor sees it, across its process incarnations: state, queue, messages in hand.

Pure bookkeeping over explicit timestamps; the Supervisor does the I/O. The worker handles its messages in order,
so of the messages handed to a process (`inflight`) the oldest is the one in its handler.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum

import msgspec

from contracts import Inbound, Message, WorkerFacts
from supervisor.config import WorkerSettings
from supervisor.loop import TimerHandle
from supervisor.processes import WorkerProcess
from supervisor.supervision import RestartTracker

# Upper bounds (seconds) of the message-handling latency histogram.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerState(Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Offer(Enum):
    """What became of a message offered to a worker."""

    QUEUED = "queued"
    REFUSED = "refused"  # the worker has failed or stopped for good: nobody will handle it here
    HELD = "held"  # the supervisor is stopping: still owed, delivered again after the restart
    DROPPED = "dropped"  # QoS 0 to a full queue: best effort, counted


@dataclass(eq=False)
class WorkerSlot:
    """The supervisor's view of one configured worker."""

    settings: WorkerSettings
    tracker: RestartTracker
    state: WorkerState = WorkerState.STOPPED
    process: WorkerProcess | None = None
    inflight: dict[int, Message] = field(default_factory=dict)  # handed to the process, oldest first
    queued: deque[Message] = field(default_factory=deque)  # waiting for room in the process
    outgoing: list[Inbound] = field(default_factory=list)  # to write at the end of this wake-up
    errors: Counter[str] = field(default_factory=Counter)  # by kind, reported by the worker or about its input
    restarts: Counter[str] = field(default_factory=Counter)  # by reason
    dropped: int = 0
    handled: int = 0
    dead_letters: int = 0
    last_exit: str | None = None
    last_exit_time: str | None = None  # ISO 8601
    last_seen: float = 0.0  # when the process last sent anything
    progress_at: float = 0.0  # since when the oldest in-flight message has been the one to wait for
    kill_reason: str | None = None
    timer: TimerHandle | None = None
    command: str | None = None  # "stop" or "restart", asked for by a person, carried out once the process exits
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # last: +Inf
    latency_sum: float = 0.0
    facts: WorkerFacts = field(default_factory=WorkerFacts)  # what the worker reported about its own work

    def report(self, facts: WorkerFacts) -> None:
        """Take the fields the worker set; the others keep their last value."""
        changes = {name: value for name in facts.__struct_fields__ if (value := getattr(facts, name)) is not None}
        self.facts = msgspec.structs.replace(self.facts, **changes)

    @property
    def name(self) -> str:
        return self.settings.name

    def offer(self, message: Message, now: float) -> Offer:
        """Queue `message` for the worker, unless it can never take it or it is QoS 0 to a full queue.

        QoS >= 1 is never dropped for a full queue: from the broker it is bounded by [mqtt] receive_maximum, and from
        other workers it is on disk in the outbox.
        """
        if self.state is WorkerState.STOPPING:
            return Offer.HELD
        if self.state in (WorkerState.FAILED, WorkerState.STOPPED):
            self.dropped += 1
            return Offer.REFUSED
        if message.qos == 0 and len(self.queued) >= self.settings.supervision.max_queued:
            self.dropped += 1
            self.errors["queue_full"] += 1
            return Offer.DROPPED
        self.queued.append(message)
        self.refill(now)
        return Offer.QUEUED

    def refill(self, now: float) -> None:
        """Move queued messages into `outgoing` (and in flight) while the running process has room."""
        if self.state is not WorkerState.RUNNING or not self.queued or self.command is not None:
            return  # (a process asked to stop for a command gets nothing more; its successor gets the queue)
        room = self.settings.supervision.max_inflight - len(self.inflight)
        if room <= 0:
            return
        if not self.inflight:
            self.progress_at = now
        for _ in range(min(room, len(self.queued))):
            message = self.queued.popleft()
            self.inflight[message.id] = message
            self.outgoing.append(message)

    def finished(self, message_id: int, now: float, seconds: float) -> bool:
        """The process finished `message_id` after `seconds` of handling; True when this slot was waiting for it."""
        self.handled += 1
        self.progress_at = now
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        return self.inflight.pop(message_id, None) is not None

    def take_back_unfinished(self) -> Message | None:
        """After the process died: put its unfinished messages back at the front of the queue.

        The oldest one was in the handler: it comes back marked redelivered (its attempt grows), or, once it has
        been in the handler during `dead_letter_after_crashes` deaths, it is returned instead, to be dead-lettered.
        The others were never started and keep their attempt.
        """
        if not self.inflight:
            return None
        head, *rest = self.inflight.values()
        self.inflight.clear()
        poison = None
        if head.attempt >= self.settings.supervision.dead_letter_after_crashes:
            poison, again = head, rest
            self.dead_letters += 1
        else:
            again = [msgspec.structs.replace(head, attempt=head.attempt + 1), *rest]
        self.queued.extendleft(reversed(again))
        return poison

    def drop_queued(self) -> list[int]:
        """Drop (and count) everything queued; returns the ids, which nobody here will handle."""
        ids = [message.id for message in self.queued]
        self.dropped += len(ids)
        self.queued.clear()
        return ids

    def overdue(self, now: float) -> tuple[str, str] | None:
        """(reason, detail) when the process looks hung: stuck on a message past its deadline, or silent past the
        heartbeat timeout while idle; None while it looks alive."""
        policy = self.settings.supervision
        if self.process is None or self.state is WorkerState.STOPPING or self.kill_reason is not None:
            return None
        if self.inflight and now - self.progress_at > policy.message_deadline_seconds:
            return "deadline", f"spent more than {policy.message_deadline_seconds:g} s on a message"
        if not self.inflight and now - self.last_seen > policy.heartbeat_timeout_seconds:
            return "heartbeat", f"sent no heartbeat for {policy.heartbeat_timeout_seconds:g} s"
        return None
