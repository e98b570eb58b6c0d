"""Carrying out a reload of the config: read and validate the whole file, plan (`supervisor.reloading`), change the
routes and subscriptions, then stop, restart and start the workers the plan names; and watch mode, which reloads
when the config file or a worker module is saved.

A reload is all or nothing: the file read, every worker it runs loaded and its subscriptions checked, before
anything changes. Refused (a ConfigError), the supervisor runs on exactly as before and says why: in the log, the
answer (a ControlError), the status (`last_reload`, a line in `problems`) and the metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from contracts.status import ReloadStatus
from supervisor import config, reloading
from supervisor.config import Settings
from supervisor.dedupe import Deduplicator, Window
from supervisor.errors import ConfigError, ControlError
from supervisor.ha_entities import EntityBundle
from supervisor.loop import Loop
from supervisor.pool import WorkerPool
from supervisor.routing import Routing
from supervisor.status import StatusReporter

log = logging.getLogger("supervisor")

WATCH_SECONDS = 1.0  # how often watch mode ([supervisor] reload_on_change) looks at the files


class Reloader:
    """Reloads the config of one supervisor, on request and (in watch mode) when a file is saved."""

    def __init__(
        self,
        settings: Settings,
        loop: Loop,
        pool: WorkerPool,
        routing: Routing,
        status: StatusReporter,
        entities: EntityBundle,
        applied: Callable[[Settings], None],
        deduplicator: Callable[[bool], Deduplicator | None],
    ) -> None:
        """`applied` takes the settings a reload applied; `deduplicator(open)` gives the handled-ids file (opening
        it if `open`; else None when it is not open)."""
        self.settings = settings
        self.loop = loop
        self.pool = pool
        self.routing = routing
        self.status = status
        self.entities = entities
        self.applied = applied
        self.deduplicator = deduplicator
        self.reloads: Counter[str] = Counter(ok=0, error=0)  # by outcome, for the metrics
        self._watched: dict[str, int] | None = None  # watch mode: the files and their modification times

    def reload(self, why: str) -> dict[str, Any]:
        """Read the config file again and apply what changed: the answer says what. Raises ControlError, having
        changed nothing, when the file (or a worker it runs) cannot be used."""
        if self.pool.stopping:
            raise ControlError("the supervisor is stopping")
        now = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            new = config.load(self.settings.path, self._environ(), strict=False, reloading=True)
            plan = reloading.plan(self.settings, new, os.environ)
            self.routing.reroute(
                remove=[*plan.removed, *(w.name for w in plan.changed)], add=[*plan.changed, *plan.added]
            )
        except Exception as exc:  # policy: nothing has changed yet; a bug found here refuses this reload only
            if not isinstance(exc, ConfigError):
                log.error("unexpected error while reading the config again", exc_info=exc)
            self.reloads["error"] += 1
            self.status.reloaded(ReloadStatus(time=now, ok=False, error=str(exc)))
            log.error("config reload (%s) refused, running on unchanged: %s", why, exc)
            raise ControlError(f"the config was not reloaded: {exc}") from None
        self._apply(plan)
        self.reloads["ok"] += 1
        summary = plan.summary()
        kept = plan.settings.kept_modules
        self.status.reloaded(
            ReloadStatus(
                time=now,
                ok=True,
                added=summary["added"],
                removed=summary["removed"],
                changed=summary["changed"],
                restart_needed=summary["restart_needed"],
                kept_modules=kept,
            )
        )
        done = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v)}" for k, v in summary.items() if v) or "nothing changed"
        log.info("config reloaded (%s): %s", why, done)
        for module, error in kept.items():
            log.error("worker module %s: its new version was not loaded, the running one stays: %s", module, error)
        for error in new.broken_modules.values():
            log.warning("skipped a worker module that cannot be used: %s", error)
        if plan.restart_needed:
            log.warning("restart the supervisor to apply %s (not applied live)", ", ".join(plan.restart_needed))
        return {**summary, "kept_modules": kept}

    def _environ(self) -> dict[str, str]:
        """The environment to read the config with: this process's, and the secrets it took at start (they are no
        longer in its environment, see `supervisor.secrets`)."""
        return dict(os.environ) | {name: secret.reveal() for name, secret in self.settings.secrets.items()}

    def _apply(self, plan: reloading.Plan) -> None:
        """Carry out `plan`, its routes already changed: the workers removed stop, the changed ones restart, the
        added ones start; the others and the connection are left as they are."""
        self.settings = plan.settings
        self.applied(plan.settings)
        self.watch_if_asked()
        for name in plan.removed:
            self.pool.remove(name)
        for worker in [*plan.changed, *plan.added]:
            if worker.supervision.dedupe_seconds > 0:
                window = Window(worker.supervision.dedupe_seconds, worker.supervision.dedupe_max_entries)
                dedupe = self.deduplicator(True)
                assert dedupe is not None
                dedupe.watch(worker.name, window)
            elif (dedupe := self.deduplicator(False)) is not None:
                dedupe.unwatch(worker.name)
        for worker in plan.changed:
            self.pool.replace(worker)
        for worker in plan.added:
            self.pool.add(worker)
        self.entities.set_workers({w.name: w.title for w in plan.settings.workers})

    # Watch mode ---------------------------------------------------------------------------------------------------

    def watch_if_asked(self) -> None:
        """Start watch mode when `[supervisor] reload_on_change` asks for it and it is not on yet."""
        if self.settings.supervisor.reload_on_change and self._watched is None:
            self._watched = self._files()
            self.loop.call_later(WATCH_SECONDS, self._watch)
            log.info("watch mode: a saved change to %s or a worker module reloads", self.settings.path)

    def _watch(self) -> None:
        """Reload when the config file or a worker module was saved, added or deleted."""
        if not self.settings.supervisor.reload_on_change or self.pool.stopping:
            self._watched = None  # off (a reload turned it off)
            return
        self.loop.call_later(WATCH_SECONDS, self._watch)  # first: whatever this reload meets, watching goes on
        files = self._files()
        before = self._watched or {}
        if files != before:
            self._watched = files
            changed = sorted({*files, *before} - {f for f in files if before.get(f) == files[f]})
            with contextlib.suppress(ControlError):  # refused: logged, and in the status
                self.reload(f"watch mode: {', '.join(Path(f).name for f in changed)} changed")

    def _files(self) -> dict[str, int]:
        """The config file and every worker module's file (a worker package's `__init__.py`: only a worker's own
        module is imported again), with their modification times (ns)."""
        paths = [self.settings.path]
        for package in self.settings.supervisor.worker_packages:
            for directory in getattr(sys.modules.get(package), "__path__", []):
                paths += [*Path(directory).glob("*.py"), *Path(directory).glob("*/__init__.py")]
        files = {}
        for path in paths:
            with contextlib.suppress(OSError):
                files[str(path)] = path.stat().st_mtime_ns
        return files
