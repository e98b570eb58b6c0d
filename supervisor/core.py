"""The Supervisor: one selector loop that owns the MQTT link and every worker process.

Messages from the broker are routed to the subscribed workers; what a worker publishes goes to the other local
subscribers and (unless local-only) to the broker. Every wake-up drains everything readable, then writes once per
worker. Workers that exit are restarted by their policy (see `supervision`), workers that stop heartbeating or
overrun a message's deadline are killed and restarted, and SIGTERM/SIGINT stop everything cleanly.

Failure policy: a worker's death never stops the supervisor, except a `significant` worker exceeding its restart
intensity, which shuts the supervisor down with exit code 1 so the service manager restarts it whole. An exception
in one of the loop's callbacks (a bug, or input nothing foresaw) costs that callback only: it is logged with its
traceback and counted (`supervisor_loop_errors_total`), and the loop goes on. Three kinds stop the supervisor
(exit code 1), because its state is known to be broken: StateBrokenError, sqlite3.Error (the outbox or the
handled-ids file cannot be written: going on would break the at-least-once promise), and MemoryError.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import ipaddress
import itertools
import logging
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from contracts import (
    EntitiesDeclared,
    ErrorReported,
    Handled,
    Heartbeat,
    LimitReached,
    Message,
    Outbound,
    Publish,
    Site,
    Started,
    StartFailed,
    StatusReported,
    Stop,
    Subscribe,
    Subscription,
)
from contracts.homeassistant import DeclaredEntity, DiscoveryBundle
from supervisor import __version__, control
from supervisor.channel import ChannelClosed
from supervisor.config import Settings, WorkerSettings
from supervisor.control import ControlAPI, ControlError
from supervisor.dedupe import Deduplicator, Window
from supervisor.delivery import Deliveries
from supervisor.discovery import last_crash_topic, node_id, supervisor_entities
from supervisor.errors import ConfigError, StartupError, StateBrokenError
from supervisor.loop import Loop
from supervisor.metrics import MetricsServer
from supervisor.mqtt import Incoming, MqttLink
from supervisor.processes import ExitStatus, WorkerProcess, shared_word, start_method_context
from supervisor.publishing import Publisher
from supervisor.router import InvalidTopicFilter, Router, covers, overlap
from supervisor.slot import ErrorKind, Offer, RestartReason, WorkerSlot, WorkerState
from supervisor.status import StatusReporter
from supervisor.supervision import RestartTracker, Verdict
from supervisor.systemd import Notifier

log = logging.getLogger("supervisor")

_LIVENESS_CHECK_SECONDS = 0.25
_MEMORY_CHECK_SECONDS = 2.0
_KILL_GRACE_SECONDS = 2.0


def _own_resident_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def site_of(settings: Settings) -> Site:
    return Site(
        base_topic=settings.supervisor.base_topic,
        availability_topic=settings.mqtt.availability_topic,
        discovery_prefix=settings.homeassistant.discovery_prefix,
        homeassistant_status_topic=settings.homeassistant.status_topic,
        node_id=node_id(settings.mqtt.client_id),
        sw_version=__version__,
        host=socket.gethostname(),
        support_url=settings.homeassistant.support_url or status_page_url(settings, from_elsewhere=False),
        status_page_url=status_page_url(settings, from_elsewhere=True),
    )


def status_page_url(settings: Settings, from_elsewhere: bool) -> str | None:
    """The address of the status page (None when it is off); `from_elsewhere`: as other machines reach it (None
    when it listens on loopback only)."""
    bind, port = settings.metrics.bind, settings.metrics.port
    if port == 0:
        return None
    address = ipaddress.ip_address(bind)
    if address.is_loopback:
        host = None if from_elsewhere else bind
    else:
        host = socket.gethostname() if address.is_unspecified else bind
    if host is None:
        return None
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def worker_subscriptions(settings: WorkerSettings, site: Site) -> list[Subscription]:
    """The subscriptions of the worker described by `settings`, validated, with its command topic (its buttons);
    raises ConfigError."""
    worker = settings.worker_class()
    worker.config = settings.config
    worker.site = site
    subscriptions = worker.subscriptions()
    for subscription in subscriptions:
        try:
            Router().add(settings.name, [subscription.topic_filter])
        except InvalidTopicFilter as exc:
            raise ConfigError(f"worker {settings.name}", "subscriptions()", str(exc)) from None
        if subscription.qos not in (0, 1, 2):
            raise ConfigError(
                f"worker {settings.name}",
                "subscriptions()",
                f"expected qos 0, 1 or 2, got {subscription.qos}",
            )
    return [*subscriptions, Subscription(site.command_topic(settings.name, "+"), qos=1, commands=True)]


class Supervisor:
    """Runs the configured workers behind one MQTT connection until SIGTERM or SIGINT."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.loop = Loop(clock, on_error=self._loop_failed)
        self.loop_errors = 0  # callbacks of the loop that raised and were survived
        self.resident_bytes = 0  # the supervisor's own, as last checked
        self.router = Router()
        self.link = MqttLink(settings.mqtt, settings.password, self.loop, self)
        self.site = site_of(settings)
        self._commands_prefix = f"{self.site.base_topic}/cmd/"
        self.slots = {w.name: WorkerSlot(w, RestartTracker(w.supervision)) for w in settings.workers}
        for slot in self.slots.values():
            for subscription in worker_subscriptions(slot.settings, self.site):
                s = subscription
                self.router.add(slot.name, [s.topic_filter], s.qos, commands=s.commands, local=s.local)
        self.control = ControlAPI(settings.supervisor.base_topic, self, self._reply)
        self.router.add(control.NAME, self.control.filters, qos=1, commands=True)
        # Subscription identifiers cost paho a properties parse per message: sent only while two filters overlap.
        self._numbered = settings.mqtt.protocol == 5 and self.router.overlapping()
        self.link.subscribe(self.router.broker_filters(numbered=self._numbered), numbered=self._numbered)
        self.started_at = time.time()
        self.exit_code = 0
        self._ids = itertools.count(1)
        self._stopping = False
        self._context: object = None
        self._wakeup: tuple[socket.socket, ...] = ()
        self.deliveries = Deliveries(self.link.ack, self._forget_publication)
        self.publisher = Publisher(settings, self.router, self.link, self.deliveries, self._offer, self._ids)
        self.dedupe: Deduplicator | None = None  # opened in run(), when a worker deduplicates
        self.version = __version__
        self.declarations: dict[str, list[DeclaredEntity]] = {control.NAME: self._own_entities()}
        self._bundle_due: bool | None = None  # None: nothing to send; else whether to ask for a full republish
        self.metrics: MetricsServer | None = None
        self.notifier = Notifier()  # reads systemd's variables now, before any worker can inherit them
        self._ready = False
        self.status = StatusReporter(
            self.loop,
            self.link,
            self.slots,
            settings.supervisor.base_topic,
            self.version,
            lambda: self.publisher.backlog,
            settings.supervisor.status_interval_seconds,
        )

    # Running ------------------------------------------------------------------------------------------------------

    def _loop_failed(self, exc: Exception) -> None:
        """A callback of the loop raised: see the failure policy in the module docstring."""
        if isinstance(exc, (StateBrokenError, sqlite3.Error, MemoryError)):
            raise exc
        self.loop_errors += 1
        log.error("unexpected error in the supervisor's loop (survived, counted)", exc_info=exc)

    def run(self) -> int:
        """Start everything, run until stopped, and return the process exit code. Raises StartupError (nothing left
        running) when the host cannot give what start-up needs."""
        wakeup = self._wakeup = self._install_signal_handlers()
        try:
            self._open()
            modules = sorted({"supervisor.runtime"} | {s.settings.worker_class.__module__ for s in self.slots.values()})
            self._context = start_method_context(self.settings.supervisor.start_method, modules)
            for slot in self.slots.values():
                self._start(slot)
            self.publisher.replay()  # after the starts: a worker that is not starting refuses its messages
            self.link.start()
            self.status.start()
            if self.notifier.watchdog_seconds:
                self.loop.call_later(self.notifier.watchdog_seconds / 2, self._watchdog)
            self.loop.after_wakeup(self._end_of_wakeup)
            self.loop.call_later(_LIVENESS_CHECK_SECONDS, self._check_liveness)
            self.loop.call_later(_MEMORY_CHECK_SECONDS, self._check_memory)
            gc.freeze()  # start-up objects leave the collector's view: shorter pauses, pages stay shared with workers
            log.info("supervisor started with workers: %s", ", ".join(self.slots) or "none")
            self._say_where_to_look()
            while not (self._stopping and all(s.process is None for s in self.slots.values())):
                self.loop.run_once()
            self.status.stopped()
            self.link.stop()
            self.notifier.close()
            self._close()
        finally:
            for slot in self.slots.values():  # only after a fatal error are any left
                if slot.process is not None:
                    slot.process.kill()
            signal.set_wakeup_fd(-1)
            for sock in wakeup:
                sock.close()
        log.info("supervisor stopped (exit code %d)", self.exit_code)
        return self.exit_code

    def _say_where_to_look(self) -> None:
        """One line at start for the person watching: where the status, the metrics and the entities are."""
        metrics = self.settings.metrics
        served = f"at http://{metrics.bind}:{self.metrics.port}/ (/metrics, /healthz)" if self.metrics else "off"
        log.info(
            "status on %s/status (retained); metrics and a status page %s; Home Assistant: the device %r, "
            "under %s/ (if ha_responder runs)",
            self.site.base_topic,
            served,
            self.site.supervisor_device().name,
            self.site.discovery_prefix,
        )

    def _open(self) -> None:
        """Take from the host what the supervisor needs before any worker starts: its state directory, the outbox,
        the handled-ids file and the metrics port. Raises StartupError, having closed what it opened."""
        state_dir = self.settings.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create the state directory {state_dir}: {exc.strerror}") from None
        if not os.access(state_dir, os.W_OK | os.X_OK):
            raise StartupError(f"cannot write to the state directory {state_dir} ([supervisor] state_dir)")
        try:
            self.publisher.open()
            windows = {
                w.name: Window(w.supervision.dedupe_seconds, w.supervision.dedupe_max_entries)
                for w in self.settings.workers
                if w.supervision.dedupe_seconds > 0
            }
            if windows:
                self.dedupe = Deduplicator(state_dir / "handled.sqlite3", windows)
            if self.settings.metrics.port:
                metrics = self.settings.metrics
                self.metrics = MetricsServer(self.loop, metrics.bind, metrics.port, self)
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        self.publisher.close()
        if self.dedupe is not None:
            self.dedupe.close()
        if self.metrics is not None:
            self.metrics.close()

    def _install_signal_handlers(self) -> tuple[socket.socket, socket.socket]:
        receive, send = socket.socketpair()
        send.setblocking(False)
        receive.setblocking(False)
        signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: None)  # the wake-up fd carries the signal number to the loop

        def signalled() -> None:
            for signum in receive.recv(64):
                if signum in (signal.SIGTERM, signal.SIGINT):
                    log.info("received %s", signal.Signals(signum).name)
                    self.shutdown()
                elif signum == signal.SIGHUP:  # its default action would end the supervisor without a word
                    log.warning("received SIGHUP: reloading the config is not supported yet; running on unchanged")

        self.loop.add_reader(receive, signalled)
        return receive, send

    def shutdown(self, exit_code: int = 0) -> None:
        """Stop routing, ask every worker to stop, and escalate to SIGTERM and SIGKILL at its deadline.

        Called a second time (a second Ctrl-C), it kills the workers at once.
        """
        self.exit_code = max(self.exit_code, exit_code)
        self.notifier.stopping()
        if self._stopping:
            for slot in self.slots.values():
                if slot.process is not None:
                    slot.process.kill()
            return
        self._stopping = True
        for slot in self.slots.values():
            self._cancel_timer(slot)
            slot.queued.clear()  # still owed: the broker and the outbox deliver them again after the restart
            if slot.process is None:
                slot.state = WorkerState.STOPPED
                continue
            slot.state = WorkerState.STOPPING
            if slot.command is None:  # else a Stop is on its way already
                slot.outgoing.append(Stop())
            slot.timer = self.loop.call_later(self._shutdown_timeout(slot), functools.partial(self._terminate, slot))

    def _shutdown_timeout(self, slot: WorkerSlot) -> float:
        timeout = slot.settings.supervision.shutdown_timeout_seconds
        return timeout if timeout is not None else self.settings.supervisor.shutdown_timeout_seconds

    def _terminate(self, slot: WorkerSlot) -> None:
        if slot.process is not None:
            log.warning("worker %s did not stop in time; terminating pid %d", slot.name, slot.process.pid)
            slot.process.terminate()
            slot.timer = self.loop.call_later(_KILL_GRACE_SECONDS, slot.process.kill)

    # Worker processes ---------------------------------------------------------------------------------------------

    def _start(self, slot: WorkerSlot) -> None:
        slot.timer = None
        slot.kill_reason = None
        state_dir = self.settings.state_dir / "workers" / slot.name
        level = logging.getLevelName(log.getEffectiveLevel())
        inherited = [*self.loop.fds(), *(s.fileno() for s in self._wakeup)]
        if slot.in_handler is None:
            slot.in_handler = shared_word(self._context)
        process = WorkerProcess(
            self._context, slot.settings, self.site, str(state_dir), level, inherited, slot.in_handler
        )
        slot.process = process
        slot.state = WorkerState.STARTING
        slot.last_seen = self.loop.clock()
        self.loop.add_reader(process.channel, lambda: self._read_worker(slot, process))
        self.loop.add_reader(process.sentinel, lambda: self._process_ended(slot, process))
        log.info("worker %s starting (pid %d)", slot.name, process.pid)

    def _read_worker(self, slot: WorkerSlot, process: WorkerProcess) -> None:
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
                    self.deliveries.done(message_id)
                    if self.dedupe is not None:
                        self._dedupe_finished(slot.name, message, handled=True)
            case Publish():
                if not self.publisher.publish(slot.name, envelope):
                    slot.errors[ErrorKind.PUBLISH] += 1
            case ErrorReported(kind=kind):
                slot.errors[kind] += 1
            case LimitReached(limit=limit):
                assert slot.process is not None
                slot.process.limit_reached = limit
                log.error("worker %s (pid %d) reached its limit: %s", slot.name, slot.process.pid, limit)
            case StartFailed(error=error):
                assert slot.process is not None
                slot.process.start_error = error
                slot.errors[ErrorKind.START] += 1
                log.error("worker %s could not start: %s", slot.name, error)
            case Started(pid=pid):
                if slot.state is WorkerState.STARTING:
                    slot.state = WorkerState.RUNNING
                slot.tracker.started(now)
                self.declarations.setdefault(slot.name, [])  # what it declared in on_start came before
                self._send_bundle()  # it may be the one that publishes discovery
                log.info("worker %s running (pid %d)", slot.name, pid)
            case EntitiesDeclared(entities=entities):
                if self.declarations.get(slot.name) != entities:
                    self.declarations[slot.name] = entities
                    self._send_bundle()
            case StatusReported(facts=facts):
                slot.report(facts)
            case Subscribe(topic_filter=topic_filter, qos=qos):
                self._subscribe(slot, topic_filter, qos)
            case Heartbeat():
                pass

    def _process_ended(self, slot: WorkerSlot, process: WorkerProcess) -> None:
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
        slot.process = None
        slot.outgoing.clear()
        self._cancel_timer(slot)
        reason = self._exit_reason(slot, process, status)
        slot.last_exit = f"{status.describe()} ({reason})"
        slot.last_exit_time = datetime.now(UTC).isoformat(timespec="seconds")
        if reason.crash and not self._stopping:
            self._crashed(slot)
        poison = slot.take_back_unfinished(process.message_in_handler)
        if poison is not None:
            self.publisher.dead_letter(slot.name, poison, slot.last_exit)
            self.deliveries.done(poison.id)
            self._dedupe_finished(slot.name, poison, handled=True)  # given up: a copy would only crash it again
        if self._stopping:
            slot.state = WorkerState.STOPPED
            log.info("worker %s stopped: %s", slot.name, status.describe())
            return
        self._after_exit(slot, status, reason)
        self.status.worker_ended()

    def _crashed(self, slot: WorkerSlot) -> None:
        """Keep and publish (retained, for Home Assistant's "Last crash") the crash that just ended `slot`'s
        process."""
        slot.last_crash, slot.last_crash_time = slot.last_exit, slot.last_exit_time
        payload = msgspec.json.encode({"time": slot.last_crash_time, "exit": slot.last_crash})
        crash = Publish(topic=last_crash_topic(self.site, slot.name), payload=payload, qos=1, retain=True)
        self.publisher.publish(control.NAME, crash)

    def _exit_reason(self, slot: WorkerSlot, process: WorkerProcess, status: ExitStatus) -> RestartReason:
        if slot.kill_reason is not None:
            return slot.kill_reason
        if slot.command is not None:
            return RestartReason.COMMAND
        if process.start_error is not None:
            return RestartReason.START_FAILED
        if process.limit_reached is not None:
            return RestartReason.MEMORY
        if status.signal is not None:
            return RestartReason.KILLED
        return RestartReason.EXIT if status.abnormal else RestartReason.NORMAL

    def _after_exit(self, slot: WorkerSlot, status: ExitStatus, reason: RestartReason) -> None:
        if slot.command is not None:  # a person asked for this exit
            command, slot.command = slot.command, None
            if command == "restart":
                slot.restarts[RestartReason.COMMAND] += 1
                self._start(slot)
            else:
                self._stop_for_good(slot)
            return
        now = self.loop.clock()
        decision = slot.tracker.exited(now, abnormal=status.abnormal or slot.kill_reason is not None)
        match decision.verdict:
            case Verdict.RESTART:
                slot.restarts[reason] += 1
                slot.state = WorkerState.BACKOFF
                log.warning("worker %s ended: %s; restarting in %.2f s", slot.name, slot.last_exit, decision.delay)
                slot.timer = self.loop.call_later(decision.delay, lambda: self._start(slot))
            case Verdict.STAY_STOPPED:
                slot.state = WorkerState.STOPPED
                log.info(
                    "worker %s ended: %s; not restarted (%s)",
                    slot.name,
                    slot.last_exit,
                    slot.settings.supervision.restart,
                )
            case Verdict.FAILED | Verdict.ESCALATE:
                slot.state = WorkerState.FAILED
                self._drop_queued(slot)
                policy = slot.settings.supervision
                log.error(
                    "worker %s failed: more than %d restarts in %g s (last: %s)",
                    slot.name,
                    policy.max_restarts,
                    policy.restart_window_seconds,
                    slot.last_exit,
                )
                if decision.verdict is Verdict.ESCALATE:
                    log.critical("worker %s is significant: stopping the supervisor", slot.name)
                    self.shutdown(exit_code=1)

    def _kill(self, slot: WorkerSlot, reason: RestartReason, detail: str) -> None:
        assert slot.process is not None
        log.error("worker %s (pid %d) %s; killing it", slot.name, slot.process.pid, detail)
        slot.kill_reason = reason
        slot.errors[ErrorKind(reason.value)] += 1  # DEADLINE and HEARTBEAT are error kinds too
        slot.process.kill()

    def _check_liveness(self) -> None:
        now = self.loop.clock()
        for slot in self.slots.values():
            verdict = slot.overdue(now)
            if verdict is not None:
                self._kill(slot, *verdict)
        self.loop.call_later(_LIVENESS_CHECK_SECONDS, self._check_liveness)

    def _check_memory(self) -> None:
        """Kill a worker whose resident memory passed its limit; warn while the supervisor's own is above its level.
        (Inside a worker, RLIMIT_DATA stops a fast allocation between two checks: see `supervisor.runtime`.)"""
        for slot in self.slots.values():
            limit = slot.settings.memory_limit_mb
            process = slot.process
            if limit is None or process is None or slot.kill_reason is not None:
                continue
            resident = process.resident_bytes()
            if resident > limit * 1024 * 1024:
                process.limit_reached = f"memory_limit_mb = {limit}"
                self._kill(
                    slot, RestartReason.MEMORY, f"uses {resident / 2**20:.0f} MiB, over memory_limit_mb = {limit}"
                )
        self.resident_bytes = _own_resident_bytes()
        warning = self.settings.supervisor.memory_warning_mb
        if warning and self.resident_bytes > warning * 1024 * 1024:
            log.warning(
                "the supervisor uses %.0f MiB of memory, above [supervisor] memory_warning_mb = %d",
                self.resident_bytes / 2**20,
                warning,
            )
        self.loop.call_later(_MEMORY_CHECK_SECONDS, self._check_memory)

    def _cancel_timer(self, slot: WorkerSlot) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None

    # Routing ------------------------------------------------------------------------------------------------------

    def _offer(self, name: str, message: Message) -> None:
        """Hand `message` to worker `name` (or to the supervisor's control API, when a worker sent a request); one
        `done` follows for it, unless the supervisor is stopping. A copy of a publication that a deduplicating
        worker has handled (or holds) already is dropped and counted instead."""
        if name == control.NAME:
            self.control.handle(message)
            self.deliveries.done(message.id)
            return
        slot = self.slots[name]
        dedupe = self.dedupe if message.publication_id is not None else None
        if dedupe is not None and dedupe.deduplicates(name):
            assert message.publication_id is not None
            if not dedupe.admit(name, message.publication_id):
                slot.duplicates += 1
                log.debug("dropped a copy of publication %s for worker %s", message.publication_id, name)
                self.deliveries.done(message.id)
                return
        if slot.offer(message, self.loop.clock()) in (Offer.REFUSED, Offer.DROPPED):
            self.deliveries.done(message.id)
            self._dedupe_finished(name, message, handled=False)

    def _dedupe_finished(self, name: str, message: Message, handled: bool) -> None:
        """Worker `name` is done with `message`; for deduplication, whether it handled it (or gave it up)."""
        if message.publication_id is not None and self.dedupe is not None and self.dedupe.deduplicates(name):
            self.dedupe.finished(name, message.publication_id, handled)

    def _drop_queued(self, slot: WorkerSlot) -> None:
        for message in slot.drop_queued():
            self.deliveries.done(message.id)
            self._dedupe_finished(slot.name, message, handled=False)

    def _subscribe(self, slot: WorkerSlot, topic_filter: str, qos: int) -> None:
        """Route `topic_filter` to the worker too (a worker's own subscription, made while it runs)."""
        if self.router.routes_to(slot.name, topic_filter):
            return
        new = self.router.number(topic_filter) is None
        known = [f for f, _, _ in self.router.broker_filters(numbered=True)]
        v5 = self.settings.mqtt.protocol == 5
        covered = not v5 and any(covers(f, topic_filter) for f, _, _ in self.router.broker_filters(numbered=False))
        overlapping = v5 and not self._numbered and any(overlap(f, topic_filter) for f in known if f != topic_filter)
        self.router.add(slot.name, [topic_filter], qos)
        log.info("worker %s subscribed to %s", slot.name, topic_filter)
        if overlapping:  # from now on the broker must say which filter each copy of a message is for
            self._numbered = True
            self.link.subscribe(self.router.broker_filters(numbered=True), numbered=True)
            self.link.subscribe_again()
        elif new and not covered:
            number = self.router.number(topic_filter)
            assert number is not None
            self.link.add_subscription(topic_filter, qos, number)

    # Home Assistant entities --------------------------------------------------------------------------------------

    def _own_entities(self) -> list[DeclaredEntity]:
        titles = {name: slot.settings.worker_class.title for name, slot in self.slots.items()}
        return supervisor_entities(self.site, titles)

    def _send_bundle(self, republish: bool = False) -> None:
        """Send every declared entity to the local subscribers of the entities topic, at the end of this wake-up."""
        self._bundle_due = republish or bool(self._bundle_due)

    def _flush_bundle(self) -> None:
        if self._bundle_due is None:
            return
        bundle = DiscoveryBundle(
            owners=[control.NAME, *self.slots], declared=self.declarations, republish=self._bundle_due
        )
        self._bundle_due = None
        payload = msgspec.msgpack.encode(bundle)
        self.publisher.publish(control.NAME, Publish(topic=self.site.entities_topic, payload=payload, local_only=True))

    def _forget_publication(self, row: int) -> None:
        self.publisher.forget(row)

    def _end_of_wakeup(self) -> None:
        """Make this wake-up's publications durable, then acknowledge, then write to workers and the broker, then
        do the outbox's housekeeping."""
        self._flush_bundle()
        self.publisher.commit()
        if self.dedupe is not None:
            self.dedupe.commit()
        self.deliveries.release()
        self._write_to_workers()
        self.status.check_availability()
        self.link.flush()
        self.publisher.tidy()
        if self.dedupe is not None:
            self.dedupe.tidy()
        if not self._ready:
            self._notify_ready_once()

    def _notify_ready_once(self) -> None:
        """READY=1 for systemd once connected with every worker past its start."""
        if self.link.connected and all(s.state is not WorkerState.STARTING for s in self.slots.values()):
            self._ready = True
            where = f"{self.settings.mqtt.host}:{self.settings.mqtt.port}"
            self.notifier.ready(f"connected to {where}; {len(self.slots)} worker(s) started")

    def _watchdog(self) -> None:
        """Tell systemd the loop is alive; sent from the loop itself, so a stuck loop stops the pings."""
        if not self._stopping:
            self.notifier.watchdog()
        assert self.notifier.watchdog_seconds is not None
        self.loop.call_later(self.notifier.watchdog_seconds / 2, self._watchdog)

    def _write_to_workers(self) -> None:
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
        self._cancel_timer(slot)
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
        self._cancel_timer(slot)
        slot.tracker.reset()
        self._start(slot)
        return slot.state.value

    def status_document(self) -> Any:
        return msgspec.to_builtins(self.status.snapshot())

    def republish(self) -> None:
        self.status.republish()

    def _controllable(self, name: str) -> WorkerSlot:
        if self._stopping:
            raise ControlError("the supervisor is stopping")
        if name not in self.slots:
            raise ControlError(f"no worker named {name!r}; workers: {', '.join(self.slots) or 'none'}")
        return self.slots[name]

    def _ask_to_exit(self, slot: WorkerSlot, command: str) -> None:
        """Ask the process to finish its messages and exit; `command` says what happens then."""
        assert slot.process is not None
        if slot.command is None:
            slot.outgoing.append(Stop())
            slot.timer = self.loop.call_later(self._shutdown_timeout(slot), functools.partial(self._terminate, slot))
        slot.command = command

    def _stop_for_good(self, slot: WorkerSlot) -> None:
        self._cancel_timer(slot)
        slot.state = WorkerState.STOPPED
        self._drop_queued(slot)
        log.info("worker %s stopped by command", slot.name)

    def _reply(self, topic: str, payload: bytes, correlation_data: bytes | None) -> None:
        self.link.publish(topic, payload, qos=1, correlation_data=correlation_data)

    # What the metrics and the status read ---------------------------------------------------------------------------

    @property
    def mqtt_connected(self) -> bool:
        return self.link.connected

    @property
    def mqtt_counters(self) -> tuple[int, int, int, int]:
        return self.link.reconnects, self.link.received, self.link.published, self.link.publish_errors

    @property
    def mqtt_fast_path(self) -> tuple[int, int]:
        return self.link.fast_path_packets

    @property
    def outbox_backlog(self) -> int:
        return self.publisher.backlog

    # LinkListener -------------------------------------------------------------------------------------------------

    def link_connected(self, session_present: bool) -> None:
        self.status.republish()
        # Without our session the broker may have lost its retained messages too: every discovery config again.
        self._send_bundle(republish=not session_present)

    def link_disconnected(self, reason: str) -> None:
        self.deliveries.connection_lost()

    def publish_confirmed(self, mid: int, failure: str | None) -> None:
        self.publisher.confirmed(mid, failure)

    def message_received(self, message: Incoming) -> None:
        """Route a message from the broker. QoS >= 1 is acknowledged once every receiver has finished it."""
        if self._stopping:
            return  # not acknowledged: the broker sends it again after the restart
        receivers = self._receivers(message)
        pressed = self._restart_pressed(message.topic)
        if pressed in receivers:  # a restart press comes through the worker's command filter; it is ours
            receivers.remove(pressed)
            receivers.append(control.NAME)
        if control.NAME in receivers:
            receivers.remove(control.NAME)
            self._supervisor_message(message)
        message_id = next(self._ids)
        if message.qos > 0:
            self.deliveries.expect_inbound(message_id, message.mid, message.qos, len(receivers))
        if not receivers:
            return
        routed = Message(
            id=message_id,
            topic=message.topic,
            payload=message.payload,
            qos=message.qos,
            retain=message.retain,
            response_topic=message.response_topic,
            correlation_data=message.correlation_data,
            publication_id=message.publication_id,
        )
        for name in receivers:
            self._offer(name, routed)

    def _restart_pressed(self, topic: str) -> str | None:
        """The worker whose restart button `topic` is, if it is one."""
        prefix = self._commands_prefix
        if topic.startswith(prefix) and topic.endswith("/restart"):
            return topic[len(prefix) : -len("/restart")]
        return None

    def _supervisor_message(self, message: Incoming) -> None:
        """A message for the supervisor itself: a control request or a restart button press."""
        request = Message(
            id=0,
            topic=message.topic,
            payload=message.payload,
            response_topic=message.response_topic,
            correlation_data=message.correlation_data,
        )
        self.control.handle(request)

    def _receivers(self, message: Incoming) -> list[str]:
        """The workers `message` goes to: bad input is counted against each worker it was meant for, and dropped."""
        routes = self.router.route(message.topic)
        if message.subscription_ids:  # this copy is for these subscriptions only; other copies cover the rest
            routes = tuple((worker, number) for worker, number in routes if number in message.subscription_ids)
        receivers = []
        for worker, number in routes:
            if self.router.is_local(worker, number):
                log.warning("dropped a message from the broker on %s: it is local to the supervisor", message.topic)
            elif len(message.payload) > self.settings.mqtt.max_payload_bytes:
                self._bad_input(worker, "oversized", message.topic, f"{len(message.payload)} bytes")
            elif message.retain and self.router.is_command(worker, number):
                self._bad_input(worker, "retained_command", message.topic, "a retained message on a command topic")
            elif not message.payload and message.topic.startswith(self._commands_prefix):
                # Clearing a retained button press (`mosquitto_pub -r -n`) reaches live subscribers as an empty
                # message without the retain flag: not a press, and not an error either.
                log.info("ignored an empty message on command topic %s (a retained press being cleared)", message.topic)
            else:
                receivers.append(worker)
        return receivers

    def _bad_input(self, worker: str, kind: str, topic: str, detail: str) -> None:
        if worker in self.slots:
            self.slots[worker].errors[kind] += 1
        log.warning("dropped a message on %s for worker %s: %s", topic, worker, detail)

    def bad_message(self, reason: str) -> None:
        log.warning("dropped a message from the broker: %s", reason)
