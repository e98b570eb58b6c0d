"""Status: the retained `<base>/status` document and the retained `<base>/worker/<name>/availability` topics.

Availability follows each worker's state at once (checked at the end of every wake-up). The status document is
published when it changes (checked once a second, and at once when a worker's process ends), and every
`status_interval_seconds` regardless.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from contracts import Site
from contracts.status import MqttStatus, ReloadStatus, Status, WorkerState, WorkerStatus
from supervisor.loop import Loop, TimerHandle
from supervisor.slot import WorkerSlot

_CHECK_SECONDS = 1.0


class Link(Protocol):
    connected: bool
    reconnects: int
    publish_errors: int

    def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, expiry: int | None = None
    ) -> int | None: ...


class StatusReporter:
    """Publishes the status and the per-worker availability of one supervisor."""

    def __init__(
        self,
        loop: Loop,
        link: Link,
        slots: Mapping[str, WorkerSlot],
        site: Site,
        version: str,
        outbox_backlog: Callable[[], int],
        interval: float,
    ) -> None:
        self.loop = loop
        self.link = link
        self.slots = slots
        self.site = site
        self.version = version
        self.outbox_backlog = outbox_backlog
        self.interval = interval
        self.started = time.monotonic()
        self._encoder = msgspec.json.Encoder()
        self._available: dict[str, bool] = {}
        self._last: Status | None = None
        self._last_sent = 0.0
        self._stopped = False  # the final document is out: nothing may replace it
        self._timer: TimerHandle | None = None
        self._parked = False  # the next check waits for I/O or the interval (see `_tick`)
        self._io_seen = 0  # the loop's I/O wake-ups at the last check
        self._last_check = 0.0  # when it was, on the loop's clock
        self.last_reload: ReloadStatus | None = None

    def start(self) -> None:
        self._timer = self.loop.call_later(_CHECK_SECONDS, self._tick)

    def touch(self) -> None:
        """At the end of every wake-up. While the check is parked (see `_tick`), a wake-up that had I/O may have
        changed the status, so the check runs again: in this very wake-up when the last one is a second old (an
        idle worker's heartbeat then costs the supervisor no wake-up of its own), else a second after the last."""
        if not self._parked or self.loop.io_wakeups == self._io_seen or self._timer is None:
            return
        self._parked = False
        self._timer.cancel()
        due = self._last_check + _CHECK_SECONDS
        if due <= self.loop.clock():
            self._tick()
        else:
            self._timer = self.loop.call_at(due, self._tick)

    def availability_topic(self, worker: str) -> str:
        return self.site.worker_availability_topic(worker)

    def check_availability(self) -> None:
        """Publish the availability of every worker whose running state changed."""
        if not self.link.connected or self._stopped:
            return
        for name, slot in self.slots.items():
            running = slot.state is WorkerState.RUNNING
            if self._available.get(name) != running:
                self._available[name] = running
                payload = b"online" if running else b"offline"
                self.link.publish(self.availability_topic(name), payload, qos=1, retain=True)

    def republish(self) -> None:
        """After a (re)connect: everything again, whatever was published before."""
        self._available.clear()
        self._last = None
        self.check_availability()
        self._publish_status(force=True)

    def document(self) -> Any:
        """The status document now, as plain values (the control API's `status`, the metrics)."""
        return msgspec.to_builtins(self.snapshot())

    def stopped(self) -> None:
        """At a clean stop, just before the link disconnects: every worker offline, and a last status that says
        `stopped`, so the retained document tells the truth while the supervisor is away."""
        self._stopped = True
        for name in self.slots:
            self._available[name] = False
            self.link.publish(self.availability_topic(name), b"offline", qos=1, retain=True)
        if self.link.connected:
            final = self.snapshot(stopped=True)
            self.link.publish(self.site.status_topic, self._encoder.encode(final), qos=1, retain=True)

    def snapshot(self, stopped: bool = False) -> Status:
        """The status document now; `stopped`: the last one of a clean stop."""
        workers = {name: _worker_status(slot) for name, slot in self.slots.items()}
        problems = [] if stopped else _problems(self.slots, self.link.connected) + _reload_problems(self.last_reload)
        if stopped:
            overall = "stopped"
        elif any(slot.state is WorkerState.FAILED for slot in self.slots.values()):
            overall = "error"
        else:
            overall = "degraded" if problems else "ok"

        def errors_of(kind: str) -> int:
            return sum(w.errors.get(kind, 0) for w in workers.values())

        ai = [w.ai_enabled for w in workers.values() if w.ai_enabled is not None]
        events = [w.event_count for w in workers.values() if w.event_count is not None]

        return Status(
            status=overall,
            problems=problems,
            sw_version=self.version,
            last_updated=datetime.now(UTC).isoformat(timespec="seconds"),
            uptime_seconds=int(time.monotonic() - self.started),
            mqtt=MqttStatus(
                connected=self.link.connected and not stopped,
                reconnects=self.link.reconnects,
                publish_errors=self.link.publish_errors,
            ),
            scrape_error_count=errors_of("scrape"),
            ai_error_count=errors_of("ai"),
            publish_error_count=errors_of("publish") + self.link.publish_errors,
            outbox_messages=self.outbox_backlog(),
            ai_enabled=any(ai) if ai else None,
            event_count=sum(events) if events else None,
            workers=workers,
            last_reload=self.last_reload,
        )

    def reloaded(self, outcome: ReloadStatus) -> None:
        """A reload of the config was tried: in the status now."""
        self.last_reload = outcome
        self._publish_status(force=False)

    def forget(self, worker: str) -> None:
        """`worker` is gone (a reload removed it)."""
        self._available.pop(worker, None)
        self._publish_status(force=False)

    def worker_ended(self) -> None:
        """A worker's process ended: the status now, not at the next tick, so that a crash and its restart count
        are seen even when the worker is running again within the second. Its availability goes first."""
        self.check_availability()
        self._publish_status(force=False)

    def _tick(self) -> None:
        """Publish the status if it changed, and check again a second later while it does. A check that finds it
        unchanged parks the next one until I/O comes (`touch`) or the interval's publication is due: nothing but
        I/O changes the status between two checks (a timer that does, such as a reload, publishes it itself)."""
        now = self.loop.clock()
        self._io_seen = self.loop.io_wakeups
        self._last_check = now
        changed = self._publish_status(force=False)
        self._parked = not changed
        delay = _CHECK_SECONDS if changed else max(self._last_sent + self.interval - now, _CHECK_SECONDS)
        self._timer = self.loop.call_later(delay, self._tick)

    def _publish_status(self, force: bool) -> bool:
        """Publish the status if it changed (or `force`, or the interval is due); whether it changed."""
        if not self.link.connected or self._stopped:
            return False
        status = self.snapshot()
        now = self.loop.clock()
        changed = self._last is None or _stable(status) != _stable(self._last)
        if not (force or changed or now - self._last_sent >= self.interval):
            return False
        self._last, self._last_sent = status, now
        self.link.publish(self.site.status_topic, self._encoder.encode(status), qos=1, retain=True)
        return changed


def _stable(status: Status) -> Status:
    """The status without the fields that change by themselves."""
    return msgspec.structs.replace(status, last_updated="", uptime_seconds=0)


def _problems(slots: Mapping[str, WorkerSlot], connected: bool) -> list[str]:
    """What keeps the status from `ok`, one line each."""
    problems = [] if connected else ["not connected to the MQTT broker"]
    for name, slot in slots.items():
        if slot.settings.load_error is not None:
            problems.append(f"worker {name} cannot run: {slot.settings.load_error}; fix it, then reload")
        elif slot.state is WorkerState.FAILED:
            problems.append(f"worker {name} has failed (last: {slot.last_exit}); restart it by command")
        elif slot.state is WorkerState.BACKOFF:
            problems.append(f"worker {name} is waiting to be restarted (last: {slot.last_exit})")
        elif slot.state is WorkerState.STARTING:
            problems.append(f"worker {name} is starting")
        elif slot.failing:
            problems.append(f"worker {name}: its last {len(slot.outcomes)} messages or runs failed")
    return problems


def _reload_problems(reload: ReloadStatus | None) -> list[str]:
    if reload is None:
        return []
    problems = [] if reload.ok else [f"the config was not reloaded (running on unchanged): {reload.error}"]
    problems += [f"worker module {m}: its new version was not loaded: {e}" for m, e in reload.kept_modules.items()]
    if reload.restart_needed:
        problems.append(f"restart the supervisor to apply {', '.join(reload.restart_needed)}")
    return problems


def _worker_status(slot: WorkerSlot) -> WorkerStatus:
    facts = slot.facts
    last_run = facts.last_run_ts
    return WorkerStatus(
        state=slot.state,
        pid=slot.process.pid if slot.process is not None else None,
        restarts=sum(slot.restarts.values()),
        restart_reasons=dict(slot.restarts),
        last_exit=slot.last_exit,
        last_exit_time=slot.last_exit_time,
        last_crash=slot.last_crash,
        last_crash_time=slot.last_crash_time,
        running_since=slot.running_since,
        errors=dict(slot.errors),
        error_count=sum(slot.errors.values()),
        handled=slot.handled,
        queue_depth=len(slot.queued),
        inflight=len(slot.inflight),
        dropped=slot.dropped,
        dead_letters=slot.dead_letters,
        duplicates=slot.duplicates if slot.settings.supervision.dedupe_seconds else None,
        last_run_ts=last_run,
        last_run_iso=datetime.fromtimestamp(last_run, UTC).isoformat(timespec="seconds") if last_run else None,
        last_run_trigger=facts.last_run_trigger,
        last_run_ok=facts.last_run_ok,
        interval_seconds=facts.interval_seconds,
        ai_enabled=facts.ai_enabled,
        ai_model=facts.ai_model,
        event_count=facts.event_count,
        fields=facts.fields,
    )
