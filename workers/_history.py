"""The history store for batch_scheduler: recorded state changes in an SQLite database.

One table, `changes (ts, entity, state)`, indexed by time and by entity. `Recorder` writes a row per change on the
worker's loop and skips a state the entity is in already; `read_changes` (an analysis window) and `delete_before`
(retention) open their own connections, so they can run on a background thread; deletes run in small transactions
so the recorder is never locked out for long.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from workers._patterns import Change


class Recorder:
    """The history database: one row per state change, written on the worker's loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = connect(path)
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS changes (ts REAL NOT NULL, entity TEXT NOT NULL, state TEXT NOT NULL);"
            "CREATE INDEX IF NOT EXISTS changes_by_ts ON changes (ts);"
            "CREATE INDEX IF NOT EXISTS changes_by_entity ON changes (entity, ts);"
        )
        rows = self.db.execute("SELECT entity, state, max(ts) FROM changes GROUP BY entity")
        self.last_state = {entity: state for entity, state, _ in rows}

    def record(self, ts: float, entity: str, state: str) -> bool:
        """Write a change of `entity` to `state`; False (nothing written) if that is its state already."""
        if self.last_state.get(entity) == state:
            return False
        with self.db:
            self.db.execute("INSERT INTO changes VALUES (?, ?, ?)", (ts, entity, state))
        self.last_state[entity] = state
        return True

    def close(self) -> None:
        self.db.close()


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the history database at `path`, in WAL mode: readers and the recorder do not block."""
    db = sqlite3.connect(path, timeout=10)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def read_changes(path: Path, start: float, end: float) -> list[Change]:
    """The changes recorded between `start` and `end`; opens its own connection (it runs on a background thread)."""
    db = connect(path)
    try:
        rows = db.execute("SELECT ts, entity, state FROM changes WHERE ts >= ? AND ts < ? ORDER BY ts", (start, end))
        return [Change(ts, entity, state) for ts, entity, state in rows]
    finally:
        db.close()


def delete_before(path: Path, cutoff: float, chunk: int = 5000) -> int:
    """Delete changes older than `cutoff` in small transactions, so the recorder is never locked out for long."""
    db, deleted = connect(path), 0
    try:
        while True:
            with db:
                cursor = db.execute(
                    "DELETE FROM changes WHERE rowid IN (SELECT rowid FROM changes WHERE ts < ? LIMIT ?)",
                    (cutoff, chunk),
                )
            deleted += cursor.rowcount
            if cursor.rowcount < chunk:
                return deleted
    finally:
        db.close()
