"""The worker pool: every configured worker's slot, and the life of its processes.

It starts a worker's process, reads what the process sends, writes it its messages, decides after an exit (restart
after a backoff, stay stopped, or failed: see `supervision`), kills a process that looks hung or passes its memory
limit, carries out the control API's restart, stop and start, and stops every worker when the supervisor stops.
What a process sends that concerns the rest of the supervisor (messages finished, publications, entities,
subscriptions) goes to its `PoolEvents` and `Publisher`. A slot's state changes only through its own methods
(`supervisor.slot`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Protocol

import msgspec

from contracts import (
    EntitiesDeclared,
    ErrorReported,
    Handled,
    Heartbeat,
    LimitReached,
    Logged,
    Message,
    Outbound,
    Publish,
    Site,
    Started,
    StartFailed,
    StatusReported,
    Stop,
    Subscribe,
)
from contracts.homeassistant import DeclaredEntity
from supervisor import control
from supervisor.config import Settings, WorkerSettings
from supervisor.errors import ChannelClosed, ControlError
from supervisor.liveness import Liveness
from supervisor.logrelay import about
from supervisor.loop import Loop
from supervisor.processes import ExitStatus, WorkerProcess, shared_word
from supervisor.publishing import Publisher
from supervisor.slot import ErrorKind, RestartReason, WorkerSlot
from supervisor.supervision import RestartTracker, Verdict

log = logging.getLogger("supervisor")

_KILL_GRACE_SECONDS = 2.0


class PoolEvents(Protocol):
    """What the pool tells the rest of the supervisor."""

    def message_done(self, worker: str, message: Message, handled: bool) -> None:
        """Worker `worker` is done with `message`: it handled it, or (`handled` False) it never will."""

    def entities_declared(self, worker: str, entities: list[DeclaredEntity] | None) -> None:
        """What `worker` declared for Home Assistant; None: it started, and declared nothing more in `on_start`."""

    def subscribed(self, worker: str, topic_filter: str, qos: int) -> None:
        """`worker` subscribed to `topic_filter` while it runs."""

    def worker_ended(self, worker: str) -> None:
        """A process of `worker` ended (its slot says how, and what happens next)."""

    def worker_removed(self, worker: str) -> None:
        """`worker`'s slot is gone (a reload removed its section), its process ended."""

    def logged(self, worker: str, logged: Logged) -> None:
        """`worker` sent log lines (for its log topic)."""

    def escalate(self) -> None:
        """A `significant` worker failed: the supervisor must stop."""


class WorkerPool:
    """The configured workers' slots and their processes."""

    def __init__(self, settings: Settings, site: Site, loop: Loop, publisher: Publisher, events: PoolEvents) -> None:
        self.settings = settings
        self.site = site
        self.loop = loop
        self.publisher = publisher
        self.events = events
        self.slots: dict[str, WorkerSlot] = {}
        self.stopping = False
        self._context: object = None  # set by `start`
        self._inherited: Callable[[], Iterable[int]] = list
        self.liveness = Liveness(loop, self.slots, self._kill)
        for worker in settings.workers:
            self.add(worker)

    def add(self, worker: WorkerSettings) -> WorkerSlot:
        """A slot for the worker `worker` describes; every configured worker comes in here. Before `start` it is
        started with the others; after (a reload added it), now. One whose removal is under way (its section came
        back before its process ended) is given its new settings instead."""
        if worker.name in self.slots:
            self.replace(worker)
            return self.slots[worker.name]
        slot = self.slots[worker.name] = WorkerSlot(worker, RestartTracker(worker.supervision))
        if self._context is not None:
            self._begin(slot)
        return slot

    def replace(self, worker: WorkerSettings) -> None:
        """Run worker `worker.name` with new settings (a reload changed its section or its module): its process
        finishes the message in hand and exits, and one with the new settings starts."""
        slot = self.slots[worker.name]
        slot.settings = worker
        slot.tracker = RestartTracker(worker.supervision)
        if slot.process is not None:
            self._ask_to_exit(slot, "reload")
            return
        slot.cancel_timer()
        self._begin(slot)

    def remove(self, name: str) -> None:
        """Stop worker `name` for good and forget it once its process is gone (a reload removed its section)."""
        slot = self.slots[name]
        if slot.process is not None:
            self._ask_to_exit(slot, "remove")
        else:
            self._forget(slot)

    def _forget(self, slot: WorkerSlot) -> None:
        slot.cancel_timer()
        self._given_up(slot, slot.drop_queued())
        assert self.slots[slot.name] is slot
        del self.slots[slot.name]
        self.events.worker_removed(slot.name)
        log.info("worker %s removed", slot.name)

    def start(self, context: object, inherited: Callable[[], Iterable[int]]) -> None:
        """Start every worker, with `context` (see `processes.start_method_context`); `inherited`: the descriptors
        each new process must close."""
        self._context, self._inherited = context, inherited
        for slot in self.slots.values():
            self._begin(slot)
        self.liveness.start()

    @property
    def stopped(self) -> bool:
        """The supervisor is stopping and every process is gone."""
        return self.stopping and all(s.process is None for s in self.slots.values())

    def stop(self) -> None:
        """Ask every worker to stop, and escalate to SIGTERM and SIGKILL at its deadline. Called a second time (a
        second Ctrl-C), it kills the workers at once."""
        if self.stopping:
            self.kill_all()
            return
        self.stopping = True
        for slot in self.slots.values():
            slot.cancel_timer()
            if slot.process is None:
                slot.queued.clear()
                slot.stopped()
                continue
            if slot.command is None:  # else a Stop is on its way already
                slot.outgoing.append(Stop())
            slot.stopping(self.loop.call_later(self._shutdown_timeout(slot), functools.partial(self._terminate, slot)))

    def kill_all(self) -> None:
        for slot in self.slots.values():
            if slot.process is not None:
                slot.process.kill()

    # Processes ----------------------------------------------------------------------------------------------------

    def _begin(self, slot: WorkerSlot) -> None:
        """Start its process, or mark it failed when its worker cannot be loaded."""
        if slot.settings.load_error is None:
            self._start(slot)
            return
        self._given_up(slot, slot.cannot_load())
        log.error("worker %s cannot run: %s", slot.name, slot.settings.load_error, extra=about(slot.name))

    def _start(self, slot: WorkerSlot) -> None:
        state_dir = self.settings.state_dir / "workers" / slot.name
        level = logging.getLevelName(log.getEffectiveLevel())
        if slot.in_handler is None:
            slot.in_handler = shared_word(self._context)
        inherited = list(self._inherited())
        process = WorkerProcess(
            self._context,
            slot.settings,
            self.site,
            str(state_dir),
            level,
            inherited,
            slot.in_handler,
            self.settings.supervisor.mqtt_log_level,
        )
        slot.starting(process, self.loop.clock())
        self.liveness.started(slot)
        self.loop.add_reader(process.channel, lambda: self._read(slot, process))
        self.loop.add_reader(process.sentinel, lambda: self._ended(slot, process))
        log.info("worker %s starting (pid %d)", slot.name, process.pid)

    def _read(self, slot: WorkerSlot, process: WorkerProcess) -> None:
        envelopes = process.channel.receive()
        now = self.loop.clock()
        slot.last_seen = now
        for envelope in envelopes:
            self._on_envelope(slot, envelope, now)
        if process.channel.closed:
            self.loop.remove_reader(process.channel)  # the exit status comes through the sentinel
        slot.refill(now)

    def _on_envelope(self, slot: WorkerSlot, envelope: Outbound, now: float) -> None:
        match envelope:
            case Handled(id=message_id, seconds=seconds, failed=failed):
                message = slot.finished(message_id, now, seconds, failed)
                if message is not None:
                    self.events.message_done(slot.name, message, handled=True)
            case Publish():
                if not self.publisher.publish(slot.name, envelope):
                    slot.errors[ErrorKind.PUBLISH] += 1
            case ErrorReported(kind=kind):
                slot.errors[kind] += 1
            case LimitReached(limit=limit):
                assert slot.process is not None
                slot.process.limit_reached = limit
                log.error(
                    "worker %s (pid %d) reached its limit: %s",
                    slot.name,
                    slot.process.pid,
                    limit,
                    extra=about(slot.name),
                )
            case StartFailed(error=error):
                assert slot.process is not None
                slot.process.start_error = error
                slot.errors[ErrorKind.START] += 1
                log.error("worker %s could not start: %s", slot.name, error, extra=about(slot.name))
            case Started(pid=pid):
                slot.running(now, datetime.now(UTC).isoformat(timespec="seconds"))
                self.events.entities_declared(slot.name, None)  # what it declared in on_start came before
                log.info("worker %s running (pid %d)", slot.name, pid)
            case EntitiesDeclared(entities=entities):
                self.events.entities_declared(slot.name, entities)
            case StatusReported(facts=facts):
                slot.report(facts)
            case Subscribe(topic_filter=topic_filter, qos=qos):
                self.events.subscribed(slot.name, topic_filter, qos)
            case Logged():
                self.events.logged(slot.name, envelope)
            case Heartbeat():
                pass

    def _ended(self, slot: WorkerSlot, process: WorkerProcess) -> None:
        status = process.exit_status()
        if status is None:
            return
        if not process.channel.closed:  # read what it sent before it died
            for envelope in process.channel.receive():
                self._on_envelope(slot, envelope, self.loop.clock())
        self.loop.remove_reader(process.sentinel)
        self.loop.remove_reader(process.channel)
        self.loop.remove_writer(process.channel)
        process.close()
        reason = slot.exit_reason(process.start_error, process.limit_reached, status.signal, status.abnormal)
        slot.ended(reason, status.describe(), datetime.now(UTC).isoformat(timespec="seconds"), self.stopping)
        poison = slot.take_back_unfinished(process.message_in_handler)
        if self.stopping:
            slot.stopped()
            log.info("worker %s stopped: %s", slot.name, status.describe())
        else:
            self._after_exit(slot, status, reason)  # a restart first: what follows can wait the ms it takes
            if reason.crash:
                self._publish_crash(slot)
        if poison is not None:
            self.publisher.dead_letter(slot.name, poison, slot.last_exit)
            self.events.message_done(slot.name, poison, handled=True)  # given up: a copy would only crash it again
        if not self.stopping:
            self.events.worker_ended(slot.name)

    def _publish_crash(self, slot: WorkerSlot) -> None:
        """Publish (retained, for Home Assistant's "Last crash") the crash that just ended `slot`'s process."""
        payload = msgspec.json.encode({"time": slot.last_crash_time, "exit": slot.last_crash})
        crash = Publish(topic=self.site.last_crash_topic(slot.name), payload=payload, qos=1, retain=True)
        self.publisher.publish(control.NAME, crash)

    def _after_exit(self, slot: WorkerSlot, status: ExitStatus, reason: RestartReason) -> None:
        if slot.command is not None:  # a person or a reload asked for this exit
            command, slot.command = slot.command, None
            if command == "restart":
                slot.restarts[RestartReason.COMMAND] += 1
                self._start(slot)
            elif command == "reload":
                slot.restarts[RestartReason.RELOAD] += 1
                self._begin(slot)
            elif command == "remove":
                self._forget(slot)
            else:
                self._stop_for_good(slot)
            return
        decision = slot.tracker.exited(self.loop.clock(), abnormal=status.abnormal or slot.kill_reason is not None)
        match decision.verdict:
            case Verdict.RESTART:
                immediate = decision.delay <= 0  # a first crash: started again in this very wake-up
                timer = None if immediate else self.loop.call_later(decision.delay, lambda: self._start(slot))
                slot.backing_off(reason, timer)
                log.warning(
                    "worker %s ended: %s; restarting in %.2f s",
                    slot.name,
                    slot.last_exit,
                    decision.delay,
                    extra=about(slot.name),
                )
                if immediate:
                    self._start(slot)
            case Verdict.STAY_STOPPED:
                slot.stopped()
                restart = slot.settings.supervision.restart
                log.info("worker %s ended: %s; not restarted (%s)", slot.name, slot.last_exit, restart)
            case Verdict.FAILED | Verdict.ESCALATE:
                self._given_up(slot, slot.failed())
                policy = slot.settings.supervision
                log.error(
                    "worker %s failed: more than %d restarts in %g s (last: %s)",
                    slot.name,
                    policy.max_restarts,
                    policy.restart_window_seconds,
                    slot.last_exit,
                    extra=about(slot.name),
                )
                if decision.verdict is Verdict.ESCALATE:
                    log.critical("worker %s is significant: stopping the supervisor", slot.name)
                    self.events.escalate()

    def _given_up(self, slot: WorkerSlot, messages: list[Message]) -> None:
        for message in messages:
            self.events.message_done(slot.name, message, handled=False)

    def _shutdown_timeout(self, slot: WorkerSlot) -> float:
        timeout = slot.settings.supervision.shutdown_timeout_seconds
        return timeout if timeout is not None else self.settings.supervisor.shutdown_timeout_seconds

    def _terminate(self, slot: WorkerSlot) -> None:
        if slot.process is not None:
            log.warning(
                "worker %s did not stop in time; terminating pid %d",
                slot.name,
                slot.process.pid,
                extra=about(slot.name),
            )
            slot.process.terminate()
            slot.timer = self.loop.call_later(_KILL_GRACE_SECONDS, slot.process.kill)

    def _kill(self, slot: WorkerSlot, reason: RestartReason, detail: str) -> None:
        assert slot.process is not None
        log.error("worker %s (pid %d) %s; killing it", slot.name, slot.process.pid, detail, extra=about(slot.name))
        slot.kill_reason = reason
        slot.errors[ErrorKind(reason.value)] += 1  # DEADLINE, HEARTBEAT and MEMORY are error kinds too
        slot.process.kill()

    # Writing to the processes ---------------------------------------------------------------------------------------

    def write(self) -> None:
        """Send every process what this wake-up gave it."""
        for slot in self.slots.values():
            if not slot.outgoing or slot.process is None:
                continue
            process = slot.process
            with contextlib.suppress(ChannelClosed):  # the process is dying; its sentinel tells us when it is gone
                process.channel.send(slot.outgoing)
            slot.outgoing.clear()
            if process.channel.pending_bytes:
                self.loop.add_writer(process.channel, functools.partial(self._write_more, process))

    def _write_more(self, process: WorkerProcess) -> None:
        try:
            done = process.channel.flush()
        except ChannelClosed:
            done = True
        if done:
            self.loop.remove_writer(process.channel)

    # The control API's actions --------------------------------------------------------------------------------------

    def restart_worker(self, name: str) -> str:
        slot = self._controllable(name)
        slot.tracker.reset()
        if slot.process is not None:
            self._ask_to_exit(slot, "restart")
            return "restarting"
        slot.cancel_timer()
        slot.restarts[RestartReason.COMMAND] += 1
        self._start(slot)
        return slot.state.value

    def stop_worker(self, name: str) -> str:
        slot = self._controllable(name)
        if slot.process is not None:
            self._ask_to_exit(slot, "stop")
            return "stopping"
        self._stop_for_good(slot)
        return slot.state.value

    def start_worker(self, name: str) -> str:
        slot = self._controllable(name)
        if slot.process is not None:
            raise ControlError(f"worker {name} is already {slot.state.value} (pid {slot.process.pid})")
        slot.cancel_timer()
        slot.tracker.reset()
        self._start(slot)
        return slot.state.value

    def _controllable(self, name: str) -> WorkerSlot:
        if self.stopping:
            raise ControlError("the supervisor is stopping")
        if name not in self.slots:
            raise ControlError(f"no worker named {name!r}; workers: {', '.join(self.slots) or 'none'}")
        slot = self.slots[name]
        if slot.command == "remove":
            raise ControlError(f"worker {name} is being removed (its section is gone from the config)")
        if slot.settings.load_error is not None:
            raise ControlError(f"worker {name} cannot run: {slot.settings.load_error}; fix it, then reload")
        return slot

    def _ask_to_exit(self, slot: WorkerSlot, command: str) -> None:
        """Ask the process to finish its messages and exit; `command` says what happens then."""
        assert slot.process is not None
        if slot.command is None:
            slot.outgoing.append(Stop())
            slot.timer = self.loop.call_later(self._shutdown_timeout(slot), functools.partial(self._terminate, slot))
        slot.command = command

    def _stop_for_good(self, slot: WorkerSlot) -> None:
        slot.stopped()
        self._given_up(slot, slot.drop_queued())
        log.info("worker %s stopped by command", slot.name)
