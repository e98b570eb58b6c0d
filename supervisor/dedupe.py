"""Deduplication: the publication ids each deduplicating worker has handled lately, so a copy is dropped.

A worker whose section sets `dedupe_seconds` gets a message whose `publication_id` it has handled within that many
seconds (or that it holds right now) only once: a replay of the outbox after a crash of the supervisor, a broker
that sends an unacknowledged message again, a publisher that repeats. A message without an id is never dropped.

What was handled is kept in memory (at most `dedupe_max_entries` ids per worker, the oldest forgotten first) and in
`<state_dir>/handled.sqlite3`, written at the end of each wake-up before the acknowledgements it allows go out, so
a restart of the supervisor keeps it. A message whose handling was finished by the worker but not yet written when
the supervisor died may still come twice: deduplication narrows at-least-once, it cannot make it exactly once.
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import StartupError

_TIDY_SECONDS = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS handled (
    worker TEXT NOT NULL,
    publication_id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (worker, publication_id)
) WITHOUT ROWID
"""


@dataclass(frozen=True)
class Window:
    """How long a worker remembers the ids it handled, and how many of them at most."""

    seconds: float
    max_entries: int


class Deduplicator:
    """The handled and held publication ids of every worker that deduplicates."""

    def __init__(self, path: Path, windows: Mapping[str, Window], clock: Callable[[], float] = time.time) -> None:
        self._windows = dict(windows)
        self._clock = clock
        self._handled: dict[str, OrderedDict[str, float]] = {name: OrderedDict() for name in self._windows}
        self._held: dict[str, set[str]] = {name: set() for name in self._windows}  # in the worker's hands now
        self._new: list[tuple[str, str, float]] = []
        self._db = _open(path)
        self._load()
        self._tidied = clock()

    def watch(self, worker: str, window: Window) -> None:
        """Deduplicate for `worker` (added or changed by a reload) too, from what the file remembers of it."""
        new = worker not in self._windows
        self._windows[worker] = window
        if new:
            self._handled[worker] = OrderedDict()
            self._held[worker] = set()
            self._load_worker(worker, self._clock())

    def unwatch(self, worker: str) -> None:
        """Deduplicate no more for `worker` (a reload turned it off); what the file holds of it ages out."""
        self._windows.pop(worker, None)
        self._handled.pop(worker, None)
        self._held.pop(worker, None)

    def deduplicates(self, worker: str) -> bool:
        return worker in self._windows

    def admit(self, worker: str, publication_id: str) -> bool:
        """False when `worker` handled `publication_id` within its window or holds it now: a copy to drop.
        Otherwise the id is held until `finished`."""
        held = self._held[worker]
        if publication_id in held:
            return False
        at = self._handled[worker].get(publication_id)
        if at is not None and self._clock() - at < self._windows[worker].seconds:
            return False
        held.add(publication_id)
        return True

    def finished(self, worker: str, publication_id: str, handled: bool) -> None:
        """`worker` is done with `publication_id`: it handled it (or it was given up), or it was dropped unhandled
        (then a later copy is delivered)."""
        self._held[worker].discard(publication_id)
        if handled:
            at = self._clock()
            self._remember(worker, publication_id, at)
            self._new.append((worker, publication_id, at))

    def commit(self) -> None:
        """Write what was handled since the last commit."""
        if self._new:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO handled VALUES (?, ?, ?)", self._new)
            self._db.execute("COMMIT")
            self._new.clear()

    def tidy(self) -> None:
        """Forget ids older than their window, in memory and on disk, at most once a minute."""
        now = self._clock()
        if now - self._tidied < _TIDY_SECONDS:
            return
        self._tidied = now
        self._db.execute("BEGIN")
        for worker, window in self._windows.items():
            handled = self._handled[worker]
            while handled and now - next(iter(handled.values())) >= window.seconds:
                handled.popitem(last=False)
            oldest = next(iter(handled.values()), now)
            self._db.execute("DELETE FROM handled WHERE worker = ? AND at < ?", (worker, oldest))
        self._db.execute("COMMIT")

    def close(self) -> None:
        self.commit()
        self._db.close()

    def _remember(self, worker: str, publication_id: str, at: float) -> None:
        handled = self._handled[worker]
        handled.pop(publication_id, None)
        handled[publication_id] = at
        if len(handled) > self._windows[worker].max_entries:
            handled.popitem(last=False)

    def _load(self) -> None:
        now = self._clock()
        longest = max((w.seconds for w in self._windows.values()), default=0.0)
        if self._windows:
            self._db.execute("DELETE FROM handled WHERE at < ?", (now - longest,))  # also ids of workers gone since
        for worker in self._windows:
            self._load_worker(worker, now)

    def _load_worker(self, worker: str, now: float) -> None:
        window = self._windows[worker]
        rows = self._db.execute(
            "SELECT publication_id, at FROM handled WHERE worker = ? AND at > ? ORDER BY at DESC LIMIT ?",
            (worker, now - window.seconds, window.max_entries),
        ).fetchall()
        for publication_id, at in reversed(rows):
            self._remember(worker, publication_id, at)


def _open(path: Path) -> sqlite3.Connection:
    """The connection; raises StartupError when the file cannot be used."""
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=0)
        # Opened after the outbox, whose exclusive lock already keeps a second supervisor away from this state dir.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")  # survives any crash of the supervisor; see the outbox for power cuts
        db.execute(_SCHEMA)
        db.execute("SELECT worker, publication_id, at FROM handled LIMIT 0")
    except sqlite3.DatabaseError as exc:
        what = "ids of handled publications; delete it to start afresh"
        raise StartupError(f"cannot use {path} ({what}): {exc}") from None
    return db
