"""The status schema: what the supervisor publishes, retained, on `<base>/status` (JSON).

Field names are the dashboard-compatible ones the product promises (`status`, `sw_version`, `last_updated`,
`uptime_seconds`, `scrape_error_count`, `ai_error_count`, `publish_error_count`, ...). Consumers should ignore
fields they do not know.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

import msgspec

Trigger = Literal["startup", "interval", "command", "catch_up"]  # what started a worker's run


class WorkerState(StrEnum):
    """Where a worker is in its life (see `supervisor.slot` for how it moves)."""

    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class WorkerFacts(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a worker reports about its own work (`ctx.report_status`); None means not reported."""

    last_run_ts: float | None = None
    last_run_trigger: Trigger | None = None
    last_run_ok: bool | None = None  # whether that run did its work (a failed run is also counted as an error)
    interval_seconds: float | None = None
    ai_enabled: bool | None = None
    ai_model: str | None = None
    event_count: int | None = None
    fields: dict[str, Any] | None = None  # the worker's own (`ctx.report_status(**fields)`): plain JSON values

    def merged(self, new: WorkerFacts) -> WorkerFacts:
        """These facts with what `new` sets (its None fields leave these as they are; `fields` merge by key)."""
        changes = {name: value for name in new.__struct_fields__ if (value := getattr(new, name)) is not None}
        if new.fields is not None:
            changes["fields"] = {**(self.fields or {}), **new.fields}
        return msgspec.structs.replace(self, **changes)


class WorkerStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One worker's entry. The fields with defaults appear only where they apply: the facts the worker itself
    reports, and `duplicates` for a worker that deduplicates."""

    state: WorkerState
    pid: int | None
    restarts: int
    restart_reasons: dict[str, int]
    last_exit: str | None  # e.g. "killed by SIGKILL (heartbeat)", "exit code 3 (start_failed)"
    last_exit_time: str | None  # ISO 8601
    last_crash: str | None  # the last exit nobody asked for (not a stop, restart or clean exit), like last_exit
    last_crash_time: str | None  # ISO 8601
    errors: dict[str, int]
    error_count: int
    handled: int
    queue_depth: int
    inflight: int
    dropped: int
    dead_letters: int
    duplicates: int | None = None
    running_since: str | None = None  # ISO 8601: when its process started running (absent while it has none)
    last_run_ts: float | None = None
    last_run_iso: str | None = None  # ISO 8601 of last_run_ts
    last_run_trigger: Trigger | None = None
    last_run_ok: bool | None = None
    interval_seconds: float | None = None
    ai_enabled: bool | None = None
    ai_model: str | None = None
    event_count: int | None = None
    fields: dict[str, Any] | None = None  # what the worker reports of its own, beyond the fields above


class MqttStatus(msgspec.Struct, frozen=True, kw_only=True):
    connected: bool
    reconnects: int
    publish_errors: int


class ReloadStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The last reload of the config (SIGHUP, `systemctl reload`, `ctl reload`, watch mode)."""

    time: str  # ISO 8601
    ok: bool  # False: the file was invalid, and nothing changed
    error: str | None = None
    added: list[str] = []
    removed: list[str] = []
    changed: list[str] = []  # restarted with their new section or module
    restart_needed: list[str] = []  # "[mqtt] host": changed in the file, applied at the next restart
    kept_modules: dict[str, str] = {}  # worker module -> why its new version was not loaded (the old one runs)


class Status(msgspec.Struct, frozen=True, kw_only=True):
    # ok | degraded (a worker starting, backing off or failing every recent run; MQTT down) | error (a worker has
    # failed) | stopped (the last document of a clean stop)
    status: str
    problems: list[str]  # one line each, what makes the status other than ok
    sw_version: str
    last_updated: str  # ISO 8601
    uptime_seconds: int
    mqtt: MqttStatus
    scrape_error_count: int
    ai_error_count: int
    publish_error_count: int
    outbox_messages: int
    ai_enabled: bool | None  # from the worker that reports it (ai_analyzer); None when none does
    event_count: int | None  # the sum of what workers report (the scraper's events); None when none does
    workers: dict[str, WorkerStatus]
    last_reload: ReloadStatus | None = None
