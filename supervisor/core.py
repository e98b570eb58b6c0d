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
import gc
import ipaddress
import itertools
import logging
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from contracts import Logged, Message, Publish, Site
from contracts.homeassistant import DeclaredEntity
from contracts.status import WorkerState
from supervisor import __version__, control, signals
from supervisor.config import Settings
from supervisor.control import ControlAPI
from supervisor.dedupe import Deduplicator, Window
from supervisor.delivery import Deliveries
from supervisor.errors import ControlError, StartupError, StateBrokenError
from supervisor.ha_entities import EntityBundle, node_id
from supervisor.logrelay import LogPublisher
from supervisor.loop import Loop
from supervisor.metrics import MetricsServer
from supervisor.mqtt import Incoming, MqttLink
from supervisor.pool import WorkerPool
from supervisor.processes import start_method_context
from supervisor.publishing import Publisher
from supervisor.reloader import Reloader
from supervisor.router import Router
from supervisor.routing import Routing
from supervisor.slot import WorkerSlot
from supervisor.status import StatusReporter
from supervisor.systemd import Notifier

log = logging.getLogger("supervisor")

_MEMORY_CHECK_SECONDS = 10.0
_MAX_WAIT_SECONDS = 60.0  # every periodic task has its own timer: the loop need not wake to look
_WATCH_SECONDS = 1.0  # how often watch mode ([supervisor] reload_on_change) looks at the files
# The periodic tasks run this long after the multiples of their periods, or in the wake-up that reads the heartbeats
# idle workers send on those multiples (`Loop`): one wake-up for both.
_PERIODIC_PHASE_SECONDS = 0.05


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


class Supervisor:
    """Runs the configured workers behind one MQTT connection until SIGTERM or SIGINT: the wiring of the parts
    and the order of a wake-up."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.version = __version__
        self.loop = Loop(clock, on_error=self._loop_failed, phase=_PERIODIC_PHASE_SECONDS)
        self.loop_errors = 0  # callbacks of the loop that raised and were survived
        self.resident_bytes = 0  # the supervisor's own, as last checked
        self.exit_code = 0
        self.site = site_of(settings)
        self.host = self.site.host
        self.link = MqttLink(settings.mqtt, settings.password, self.loop, self)
        router, ids = Router(), itertools.count(1)
        self.deliveries = Deliveries(self.link.ack, self._forget_publication)
        self.publisher = Publisher(settings, self.site, router, self.link, self.deliveries, self._offer, ids)
        self.pool = WorkerPool(settings, self.site, self.loop, self.publisher, self)
        self.status = StatusReporter(
            self.loop,
            self.link,
            self.pool.slots,
            self.site,
            self.version,
            lambda: self.publisher.backlog,
            settings.supervisor.status_interval_seconds,
        )
        self.control = ControlAPI(self.site, self.pool, self.status, self._reply, self._reload)
        self.routing = Routing(
            settings, self.site, self.link, router, self.pool.slots, self.deliveries, self.control, ids, clock
        )
        level = settings.supervisor.mqtt_log_level
        self.logs = LogPublisher(self.site, level, lambda p: self.publisher.publish(control.NAME, p), clock)
        titles = {name: slot.settings.title for name, slot in self.pool.slots.items()}
        self.entities = EntityBundle(self.site, titles, lambda p: self.publisher.publish(control.NAME, p))
        self.dedupe: Deduplicator | None = None  # opened in run(), when a worker deduplicates
        self.metrics: MetricsServer | None = None
        self.notifier = Notifier()  # reads systemd's variables now, before any worker can inherit them
        self.reloader = Reloader(
            settings,
            self.loop,
            self.pool,
            self.routing,
            self.status,
            self.entities,
            self._settings_reloaded,
            self._deduplicator,
        )
        self._ready = False

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
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        wakeup = signals.install(self.loop, dict.fromkeys(handled, self._signalled))
        log.addHandler(self.logs)
        try:
            self._open()
            slots = self.pool.slots.values()
            modules = sorted({"supervisor.worker_process"} | {s.settings.worker_class.__module__ for s in slots})
            context = start_method_context(self.settings.supervisor.start_method, modules)
            self.pool.start(context, lambda: [*self.loop.fds(), *(s.fileno() for s in wakeup)])
            self.publisher.replay()  # after the starts: a worker that is not starting refuses its messages
            self.link.start()
            self.status.start()
            if self.notifier.watchdog_seconds:
                self.loop.call_later(self.notifier.watchdog_seconds / 2, self._watchdog)
            self.loop.after_wakeup(self._end_of_wakeup)
            self.loop.call_later(_MEMORY_CHECK_SECONDS, self._check_memory, aligned=True)
            self.reloader.watch_if_asked()
            gc.freeze()  # start-up objects leave the collector's view: shorter pauses, pages stay shared with workers
            log.info("supervisor started with workers: %s", ", ".join(self.pool.slots) or "none")
            self._say_where_to_look()
            while not self.pool.stopped:
                self.loop.run_once(max_wait=_MAX_WAIT_SECONDS)
            log.removeHandler(self.logs)
            self.status.stopped()
            self.link.stop()
            self.notifier.close()
            self._close()
        finally:
            self.pool.kill_all()  # only after a fatal error are any left
            signals.uninstall(wakeup)
            log.removeHandler(self.logs)
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
                self.dedupe = self.routing.dedupe = Deduplicator(state_dir / "handled.sqlite3", windows)
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

    def _signalled(self, signum: signal.Signals) -> None:
        if signum == signal.SIGHUP:  # `systemctl reload` (ExecReload), or kill -HUP
            with contextlib.suppress(ControlError):  # refused: logged, and in the status
                self.reloader.reload("SIGHUP")
            return
        log.info("received %s", signum.name)
        self.shutdown()

    def _reload(self, why: str) -> dict[str, Any]:
        return self.reloader.reload(why)  # the control API comes before the reloader, which needs its routes

    def _settings_reloaded(self, settings: Settings) -> None:
        """A reload applied `settings` (its keys that need a restart as they run now)."""
        self.settings = self.pool.settings = self.routing.settings = settings
        self.status.interval = settings.supervisor.status_interval_seconds
        self.logs.set_level(settings.supervisor.mqtt_log_level)

    def _deduplicator(self, open_file: bool) -> Deduplicator | None:
        """The handled-ids file; `open_file`: opened now if no worker deduplicated before (a reload added one that
        does)."""
        if self.dedupe is None and open_file:
            self.dedupe = self.routing.dedupe = Deduplicator(self.settings.state_dir / "handled.sqlite3", {})
        return self.dedupe

    def shutdown(self, exit_code: int = 0) -> None:
        """Stop routing and stop every worker (see `WorkerPool.stop`; a second call kills them at once)."""
        self.exit_code = max(self.exit_code, exit_code)
        self.notifier.stopping()
        self.routing.stopping = True
        self.pool.stop()

    def _check_memory(self) -> None:
        """Warn while the supervisor's own resident memory is above its level."""
        self.resident_bytes = _own_resident_bytes()
        warning = self.settings.supervisor.memory_warning_mb
        if warning and self.resident_bytes > warning * 1024 * 1024:
            log.warning(
                "the supervisor uses %.0f MiB of memory, above [supervisor] memory_warning_mb = %d",
                self.resident_bytes / 2**20,
                warning,
            )
        self.loop.call_later(_MEMORY_CHECK_SECONDS, self._check_memory, aligned=True)

    def _end_of_wakeup(self) -> None:
        """Make this wake-up's publications durable, then acknowledge, then write to workers and the broker, then
        do the outbox's housekeeping."""
        self.entities.flush()
        self.publisher.commit()
        if self.dedupe is not None:
            self.dedupe.commit()
        self.deliveries.release()
        self.pool.write()
        self.status.check_availability()
        self.status.touch()
        self.link.flush()
        self.publisher.tidy()
        if self.dedupe is not None:
            self.dedupe.tidy()
        if not self._ready:
            self._notify_ready_once()

    def _notify_ready_once(self) -> None:
        """READY=1 for systemd once connected with every worker past its start."""
        slots = self.pool.slots.values()
        if self.link.connected and all(s.state is not WorkerState.STARTING for s in slots):
            self._ready = True
            where = f"{self.settings.mqtt.host}:{self.settings.mqtt.port}"
            self.notifier.ready(f"connected to {where}; {len(slots)} worker(s) started")

    def _watchdog(self) -> None:
        """Tell systemd the loop is alive; sent from the loop itself, so a stuck loop stops the pings."""
        if not self.pool.stopping:
            self.notifier.watchdog()
        assert self.notifier.watchdog_seconds is not None
        self.loop.call_later(self.notifier.watchdog_seconds / 2, self._watchdog)

    def _offer(self, name: str, message: Message) -> None:
        self.routing.offer(name, message)

    def _forget_publication(self, row: int) -> None:
        self.publisher.forget(row)

    def _reply(self, topic: str, payload: bytes, correlation_data: bytes | None) -> None:
        self.link.publish(topic, payload, qos=1, correlation_data=correlation_data)

    # PoolEvents: what the workers' processes did that the rest must know --------------------------------------------

    def message_done(self, worker: str, message: Message, handled: bool) -> None:
        self.routing.done(worker, message, handled)

    def entities_declared(self, worker: str, entities: list[DeclaredEntity] | None) -> None:
        self.entities.declare(worker, entities)

    def subscribed(self, worker: str, topic_filter: str, qos: int) -> None:
        self.routing.subscribe(worker, topic_filter, qos)

    def worker_ended(self, worker: str) -> None:
        self.status.worker_ended()

    def escalate(self) -> None:
        self.shutdown(exit_code=1)

    def worker_removed(self, worker: str) -> None:
        for topic in (self.site.worker_availability_topic(worker), self.site.last_crash_topic(worker)):
            self.publisher.publish(control.NAME, Publish(topic=topic, payload=b"", qos=1, retain=True))
        self.status.forget(worker)
        self.logs.forget(worker)

    def logged(self, worker: str, logged: Logged) -> None:
        self.logs.lines(worker, logged)

    # LinkListener -------------------------------------------------------------------------------------------------

    def link_connected(self, session_present: bool) -> None:
        self.routing.link_connected()
        self.status.republish()
        # Without our session the broker may have lost its retained messages too: every discovery config again.
        self.entities.send_soon(republish=not session_present)

    def link_disconnected(self, reason: str) -> None:
        self.deliveries.connection_lost()

    def publish_confirmed(self, mid: int, failure: str | None) -> None:
        self.publisher.confirmed(mid, failure)

    def message_received(self, message: Incoming) -> None:
        self.routing.message_received(message)

    def bad_message(self, reason: str) -> None:
        log.warning("dropped a message from the broker: %s", reason)

    # Observed: what the metrics read --------------------------------------------------------------------------------

    @property
    def slots(self) -> Mapping[str, WorkerSlot]:
        return self.pool.slots

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

    @property
    def reloads(self) -> Mapping[str, int]:
        return self.reloader.reloads

    @property
    def last_reload_ok(self) -> bool | None:
        last = self.status.last_reload
        return None if last is None else last.ok

    def status_document(self) -> Any:
        return self.status.document()
