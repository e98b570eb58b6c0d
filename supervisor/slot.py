"""One worker as the supervisor sees it, across its process incarnations: state, queue, messages in hand.

Pure bookkeeping over explicit timestamps; the worker pool (`supervisor.pool`) does the I/O. Its state changes only
in the methods of "Lifecycle", so its state machine reads in one place:

    STOPPED/BACKOFF/FAILED --starting--> STARTING --running--> RUNNING --stopping--> STOPPING
    any state with a process --ended--> then backing_off (BACKOFF), stopped (STOPPED) or failed (FAILED)
    any state without a process --cannot_load--> FAILED (its worker's module is broken)

The worker handles its messages in order and reports them finished once per batch it read, so after a death the
messages still in flight may have been finished already, be waiting, or be the one in the handler; the process says
which (`message_in_handler`).
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

import msgspec

from contracts import Inbound, Message, WorkerFacts
from contracts.status import WorkerState
from supervisor.config import WorkerSettings
from supervisor.loop import TimerHandle
from supervisor.processes import WorkerProcess
from supervisor.supervision import RestartTracker

# A worker whose last this many outcomes (messages handled, runs reported) all failed makes the status degraded.
RECENT_OUTCOMES = 3
# Upper bounds (seconds) of the message-handling latency histogram.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ErrorKind(StrEnum):
    """The errors the supervisor and the worker loop count for every worker (workers add their own kinds, which
    they list in `Worker.error_kinds`)."""

    HANDLER = "handler"  # on_message, on_command or a callback raised
    DECODE = "decode"  # the handler could not decode a payload
    START = "start"  # on_start raised
    STOP = "stop"  # on_stop raised
    OVERSIZED = "oversized"  # a payload over [mqtt] max_payload_bytes
    RETAINED_COMMAND = "retained_command"  # a retained message on a command topic
    QUEUE_FULL = "queue_full"  # QoS 0 dropped for a full queue
    DEADLINE = "deadline"  # killed: one message took longer than message_deadline_seconds
    HEARTBEAT = "heartbeat"  # killed: no heartbeat for heartbeat_timeout_seconds
    PUBLISH = "publish"  # a publication refused: its topic cannot be published to
    MEMORY = "memory"  # it reached its memory limit (memory_limit_mb)


class RestartReason(StrEnum):
    """Why a worker was started again."""

    EXIT = "exit"  # it exited with a non-zero code
    NORMAL = "normal"  # it exited with code 0 by itself (a `permanent` worker is started again)
    KILLED = "killed"  # a signal ended it (kill -9, the OOM killer)
    START_FAILED = "start_failed"  # its on_start raised
    DEADLINE = "deadline"  # the supervisor killed it: stuck on one message
    HEARTBEAT = "heartbeat"  # the supervisor killed it: silent while idle
    MEMORY = "memory"  # it reached its memory limit, or the supervisor killed it for passing it
    COMMAND = "command"  # a person asked (control API, restart button)
    RELOAD = "reload"  # a config reload changed its section or its module

    @property
    def crash(self) -> bool:
        """Whether an exit for this reason is a crash: one nobody asked for and the worker did not choose."""
        return self not in (RestartReason.COMMAND, RestartReason.NORMAL, RestartReason.RELOAD)


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
    duplicates: int = 0  # copies of a publication it had handled (or held) already, dropped (`dedupe_seconds`)
    handled: int = 0
    dead_letters: int = 0
    last_exit: str | None = None
    last_exit_time: str | None = None  # ISO 8601
    last_crash: str | None = None  # the last exit nobody asked for, as last_exit says it
    last_crash_time: str | None = None  # ISO 8601
    running_since: str | None = None  # ISO 8601: when its process finished starting; None while it has none
    last_seen: float = 0.0  # when the process last sent anything
    progress_at: float = 0.0  # since when the oldest in-flight message has been the one to wait for
    in_handler: Any = None  # the shared word each of its processes writes (`processes.shared_word`), made once
    kill_reason: RestartReason | None = None  # the supervisor killed the process: DEADLINE or HEARTBEAT
    timer: TimerHandle | None = None
    # What to do once the process exits, asked for by a person or a reload: "stop", "restart", "reload" (start it
    # with its new settings) or "remove" (forget it)
    command: str | None = None
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # last: +Inf
    latency_sum: float = 0.0
    facts: WorkerFacts = field(default_factory=WorkerFacts)  # what the worker reported about its own work
    # Whether each of its last few messages and reported runs succeeded, newest last.
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=RECENT_OUTCOMES))

    # Lifecycle ----------------------------------------------------------------------------------------------------

    def starting(self, process: WorkerProcess, now: float) -> None:
        """A process was started for it."""
        self.timer = None
        self.kill_reason = None
        self.process = process
        self.state = WorkerState.STARTING
        self.last_seen = now

    def running(self, now: float, time: str) -> None:
        """Its process finished `on_start` (at ISO `time`)."""
        if self.state is WorkerState.STARTING:
            self.state = WorkerState.RUNNING
            self.running_since = time
        self.tracker.started(now)

    def stopping(self, timer: TimerHandle) -> None:
        """Its process was asked to stop (because the supervisor stops); `timer` escalates to a signal."""
        self.queued.clear()  # still owed: the broker and the outbox deliver them again after the restart
        self.state = WorkerState.STOPPING
        self.timer = timer

    def ended(self, reason: RestartReason, description: str, time: str, stopping: bool) -> None:
        """Its process is gone: `description` of its exit, ISO `time`; `stopping`: the supervisor stops (then
        nothing is a crash). Its state is decided next: `backing_off`, `stopped` or `failed`."""
        self.process = None
        self.running_since = None
        self.outgoing.clear()
        self.cancel_timer()
        self.last_exit, self.last_exit_time = f"{description} ({reason})", time
        if reason.crash and not stopping:
            self.last_crash, self.last_crash_time = self.last_exit, time

    def exit_reason(
        self, start_error: str | None, limit_reached: str | None, signal: int | None, abnormal: bool
    ) -> RestartReason:
        """Why its process (which reported `start_error` or `limit_reached`, and ended by `signal` or an exit code,
        `abnormal` unless 0) ended, for `ended`."""
        if self.kill_reason is not None:
            return self.kill_reason
        if self.command is not None:  # asked for: by a person, or by a reload ("reload", "remove")
            return RestartReason.RELOAD if self.command in ("reload", "remove") else RestartReason.COMMAND
        if start_error is not None:
            return RestartReason.START_FAILED
        if limit_reached is not None:
            return RestartReason.MEMORY
        if signal is not None:
            return RestartReason.KILLED
        return RestartReason.EXIT if abnormal else RestartReason.NORMAL

    def backing_off(self, reason: RestartReason, timer: TimerHandle | None) -> None:
        """It will be started again when `timer` fires (None: at once, by the caller)."""
        self.restarts[reason] += 1
        self.state = WorkerState.BACKOFF
        self.timer = timer

    def stopped(self) -> None:
        """It stays down until started again (a command, or its restart policy)."""
        self.cancel_timer()
        self.state = WorkerState.STOPPED

    def failed(self) -> list[Message]:
        """It restarted too often: down until a person restarts it. Returns its queued messages, now dropped."""
        self.state = WorkerState.FAILED
        return self.drop_queued()

    def cannot_load(self) -> list[Message]:
        """Its worker cannot be loaded (`settings.load_error`): down until a reload finds it fixed. Returns its
        queued messages, now dropped."""
        self.state = WorkerState.FAILED
        self.last_exit = self.settings.load_error
        return self.drop_queued()

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # Its work -----------------------------------------------------------------------------------------------------

    def report(self, facts: WorkerFacts) -> None:
        """Take the fields the worker set; the others keep their last value. A run's outcome is one outcome."""
        self.facts = self.facts.merged(facts)
        if facts.last_run_ok is not None:
            self.outcomes.append(facts.last_run_ok)

    @property
    def failing(self) -> bool:
        """Everything it did lately failed: its last few messages and reported runs (at least one)."""
        return bool(self.outcomes) and not any(self.outcomes)

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
            self.errors[ErrorKind.QUEUE_FULL] += 1
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

    def finished(self, message_id: int, now: float, seconds: float, failed: bool) -> Message | None:
        """The process finished `message_id` after `seconds` of handling (its handler raised: `failed`); the
        message, when this slot was waiting for it."""
        self.handled += 1
        if self.facts.last_run_ok is None:  # a worker that reports its runs is judged by them, not by messages
            self.outcomes.append(not failed)
        self.progress_at = now
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        return self.inflight.pop(message_id, None)

    def take_back_unfinished(self, in_handler: int) -> Message | None:
        """After the process died: put its unfinished messages back at the front of the queue, in order.

        `in_handler` is the id of the message the process was handling when it died (0: none, it died between
        messages). That message alone is blamed: its `crashes` grows, and once it reaches
        `dead_letter_after_crashes` it is returned instead of queued, to be dead-lettered. The others carry no
        blame. A worker handles its messages in the order they were sent, so those sent before the one in hand were
        finished (their reports died with the process) and those after it were never started: only the first kind
        and the one in hand count as delivered again (`attempt` grows). After a death between messages nobody can
        tell which were seen, so every one of them counts as delivered again.
        """
        limit = self.settings.supervision.dead_letter_after_crashes
        poison = None
        again = []
        seen = True
        for message in self.inflight.values():
            crashes = message.crashes
            if message.id == in_handler:
                crashes += 1
            if crashes >= limit:
                poison = msgspec.structs.replace(message, crashes=crashes)
                self.dead_letters += 1
            else:
                again.append(msgspec.structs.replace(message, attempt=message.attempt + int(seen), crashes=crashes))
            if message.id == in_handler:
                seen = False
        self.inflight.clear()
        self.queued.extendleft(reversed(again))
        return poison

    def drop_queued(self) -> list[Message]:
        """Drop (and count) everything queued; returns those messages, which nobody here will handle."""
        dropped = list(self.queued)
        self.dropped += len(dropped)
        self.queued.clear()
        return dropped

    def next_deadline(self, now: float) -> float | None:
        """The earliest time at which `overdue` can find its process hung, as things stand at `now` (a message that
        comes later has its deadline later still); None while there is nothing to watch."""
        policy = self.settings.supervision
        if self.process is None or self.state is WorkerState.STOPPING or self.kill_reason is not None:
            return None
        if self.inflight:
            return self.progress_at + policy.message_deadline_seconds
        return min(self.last_seen + policy.heartbeat_timeout_seconds, now + policy.message_deadline_seconds)

    def overdue(self, now: float) -> tuple[RestartReason, str] | None:
        """(reason, detail) when the process looks hung: stuck on a message past its deadline, or silent past the
        heartbeat timeout while idle; None while it looks alive."""
        policy = self.settings.supervision
        if self.process is None or self.state is WorkerState.STOPPING or self.kill_reason is not None:
            return None
        if self.inflight and now - self.progress_at > policy.message_deadline_seconds:
            return RestartReason.DEADLINE, f"spent more than {policy.message_deadline_seconds:g} s on a message"
        if not self.inflight and now - self.last_seen > policy.heartbeat_timeout_seconds:
            return RestartReason.HEARTBEAT, f"sent no heartbeat for {policy.heartbeat_timeout_seconds:g} s"
        return None
