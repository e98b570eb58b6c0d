"""The outbox: every QoS >= 1 publication of a worker, kept on disk until everyone it was for has it.

A row is added (and committed at the end of the wake-up, before its bytes leave for the broker) when a worker
publishes, and removed once the broker has confirmed it and every local subscriber has handled it. Rows left by a
supervisor that died are replayed at start-up: at least once, never lost. SQLite in WAL mode, standard library.
`synchronous = NORMAL` survives a crash of the process; `FULL` also a power cut, at the price of an fsync per
wake-up that writes (slow on SD cards).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from contracts import Publish

_SCHEMA = """
CREATE TABLE IF NOT EXISTS publications (
    id INTEGER PRIMARY KEY,
    worker TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    expiry INTEGER,
    local_only INTEGER NOT NULL
)
"""


class Outbox:
    """Durable publications, written in one transaction per wake-up."""

    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(_SCHEMA)
        self._in_transaction = False
        self._removals: list[tuple[int]] = []
        (self.backlog,) = self._db.execute("SELECT count(*) FROM publications").fetchone()

    def add(self, worker: str, publication: Publish) -> int:
        """Store `publication` (durable at the next `commit`); returns its row id."""
        self._begin()
        cursor = self._db.execute(
            "INSERT INTO publications (worker, topic, payload, qos, retain, expiry, local_only) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                worker,
                publication.topic,
                publication.payload,
                publication.qos,
                publication.retain,
                publication.expiry,
                publication.local_only,
            ),
        )
        self.backlog += 1
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def remove(self, row: int) -> None:
        """Forget row `row` at the next `commit`: everyone it was for has it."""
        self._removals.append((row,))

    def commit(self) -> None:
        if self._removals:
            self._begin()
            self._db.executemany("DELETE FROM publications WHERE id = ?", self._removals)
            self.backlog -= len(self._removals)
            self._removals.clear()
        if self._in_transaction:
            self._db.execute("COMMIT")
            self._in_transaction = False

    def pending(self) -> list[tuple[int, str, Publish]]:
        """Every stored publication, oldest first: what a previous run left undelivered."""
        rows = self._db.execute(
            "SELECT id, worker, topic, payload, qos, retain, expiry, local_only FROM publications ORDER BY id"
        )
        return [
            (
                row,
                worker,
                Publish(
                    topic=topic,
                    payload=payload,
                    qos=qos,
                    retain=bool(retain),
                    expiry=expiry,
                    local_only=bool(local_only),
                ),
            )
            for row, worker, topic, payload, qos, retain, expiry, local_only in rows
        ]

    def close(self) -> None:
        self.commit()
        self._db.close()

    def _begin(self) -> None:
        if not self._in_transaction:
            self._db.execute("BEGIN")
            self._in_transaction = True
