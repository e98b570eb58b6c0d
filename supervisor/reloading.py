"""Reloading the config: what differs between the running settings and the file read again, and what of it a
running supervisor applies.

Applied live: the worker sections (a worker added is started, one removed is stopped and forgotten, one whose
section or module changed is restarted with its new settings; the others are left alone) and the keys of
`[supervisor]` in `LIVE_SUPERVISOR_KEYS`. Every other key needs a restart: they name the connection and its session
(`[mqtt]`: a new client id or broker would be a new session, and what the old one held would be lost), where state
and topics live (`base_topic`, `state_dir`, `[homeassistant]`: every retained topic and entity id hangs on them), how
processes start and the outbox syncs (`start_method`, `outbox_sync`), and the metrics socket (`[metrics]`). A
reload that changes one of them applies everything else and names each such key in `restart_needed`; so does a
secret variable that a section names for the first time (until a restart it stays in the supervisor's environment,
see `supervisor.secrets`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import msgspec

from supervisor.config import Settings, WorkerSettings

# The [supervisor] keys a running supervisor takes from a reload.
LIVE_SUPERVISOR_KEYS = frozenset(
    {
        "shutdown_timeout_seconds",
        "status_interval_seconds",
        "memory_warning_mb",
        "reload_on_change",
        "mqtt_log_level",
        "worker_packages",
    }
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a reload does."""

    settings: Settings  # what runs after it: the file's, with the keys that need a restart as they run now
    added: list[WorkerSettings]
    removed: list[str]
    changed: list[WorkerSettings]  # restarted with their new settings
    restart_needed: list[str]  # "[mqtt] host": keys whose new value waits for a restart

    def summary(self) -> dict[str, list[str]]:
        return {
            "added": [w.name for w in self.added],
            "removed": self.removed,
            "changed": [w.name for w in self.changed],
            "restart_needed": self.restart_needed,
        }


def plan(running: Settings, new: Settings, environment: Mapping[str, str]) -> Plan:
    """Compare the running settings with `new` (the file read again); `environment`: the supervisor's own."""
    before = {w.name: w for w in running.workers}
    after = {w.name: w for w in new.workers}
    added = [w for name, w in after.items() if name not in before]
    removed = [name for name in before if name not in after]
    changed = [w for name, w in after.items() if name in before and not _same_worker(before[name], w)]
    renewed = {w.name for w in changed}
    workers = tuple(before[w.name] if w.name in before and w.name not in renewed else w for w in new.workers)
    restart_needed = sorted(_restart_needed(running, new))
    # A secret variable first named now is still in the supervisor's environment, which every worker inherits (its
    # /proc/<pid>/environ): the worker gets it, and a restart takes it out of the others' reach.
    exposed = sorted(n for n in new.secret_variables - running.secret_variables if n in environment)
    restart_needed += [f"the secret variable {name}" for name in exposed]
    live_supervisor = {key: getattr(new.supervisor, key) for key in LIVE_SUPERVISOR_KEYS}
    settings = dataclasses.replace(
        running,
        supervisor=msgspec.structs.replace(running.supervisor, **live_supervisor),
        workers=workers,
        available_workers=new.available_workers,
        broken_modules=new.broken_modules,
        kept_modules=new.kept_modules,
        secret_variables=running.secret_variables | new.secret_variables,
        secrets=running.secrets | new.secrets,
    )
    return Plan(settings, added, removed, changed, restart_needed)


def _same_worker(a: WorkerSettings, b: WorkerSettings) -> bool:
    """Whether worker settings `a` and `b` would run the same: the same class (a module imported again at the
    reload makes a new one), section and secrets."""
    return (
        a.worker_class is b.worker_class
        and a.supervision == b.supervision
        and a.config == b.config
        and a.load_error == b.load_error
        and {k: v.reveal() for k, v in a.environment.items()} == {k: v.reveal() for k, v in b.environment.items()}
    )


def _restart_needed(running: Settings, new: Settings) -> Iterator[str]:
    tables: list[tuple[str, msgspec.Struct, msgspec.Struct]] = [
        ("supervisor", running.supervisor, new.supervisor),
        ("mqtt", running.mqtt, new.mqtt),
        ("metrics", running.metrics, new.metrics),
        ("homeassistant", running.homeassistant, new.homeassistant),
    ]
    for table, old, now in tables:
        for key in old.__struct_fields__:
            if table == "supervisor" and key in LIVE_SUPERVISOR_KEYS:
                continue
            if getattr(old, key) != getattr(now, key):
                yield f"[{table}] {key}"
