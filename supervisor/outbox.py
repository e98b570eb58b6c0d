"""The outbox: every QoS >= 1 publication of a worker, kept on disk until everyone it was for has it.

A row is added (and committed at the end of the wake-up, before its bytes leave for the broker) when a worker
publishes, and removed once the broker has confirmed it and every local subscriber has handled it. Rows left by a
supervisor that died are replayed at start-up: at least once, never lost. SQLite in WAL mode, standard library.

Durability (`[supervisor] outbox_sync`): `OFF` hands every commit to the operating system, which survives any crash
of the supervisor and costs no fsync; a power cut may lose the outbox, and an outbox found corrupt at start-up is
moved aside (and logged) so the supervisor still starts. `NORMAL` also survives a power cut, except for the last
moments, but the fsync of each WAL checkpoint stalls the supervisor's loop (tens of ms here, more on SD cards).
`FULL` fsyncs every commit.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path

from contracts import Publish

log = logging.getLogger("supervisor")

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

    def __init__(self, path: Path, synchronous: str = "OFF") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db, self.backlog = _open(path, synchronous)
        except sqlite3.DatabaseError as exc:
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            log.error("the outbox %s is unreadable (%s); moved to %s, starting with an empty one", path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{path}{suffix}").rename(f"{aside}{suffix}")
            self._db, self.backlog = _open(path, synchronous)
        self._in_transaction = False
        self._removals: list[tuple[int]] = []

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


def _open(path: Path, synchronous: str) -> tuple[sqlite3.Connection, int]:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute(_SCHEMA)
        (count,) = db.execute("SELECT count(*) FROM publications").fetchone()
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db, count
