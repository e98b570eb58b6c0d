"""The outbox: every QoS >= 1 publication of a worker, kept on disk until everyone it was for has it.

A row is added (and committed at the end of the wake-up, before its bytes leave for the broker) when a worker
publishes, and removed once the broker has confirmed it and every local subscriber has handled it. Rows left by a
supervisor that died are replayed at start-up: at least once, never lost. SQLite in WAL mode, standard library,
opened with an exclusive lock: one transaction costs no file-lock calls, and a second supervisor given the same
state directory is refused instead of sharing the file.

Only the additions are urgent (`commit`, before the publications' bytes leave). Removals are not (a removal lost in
a crash means one more delivery, never a lost one), and neither is checkpointing the write-ahead log, so `tidy`
does both after the wake-up's bytes have left: removals `REMOVALS_BATCH` at a time, or once the oldest has waited
`REMOVALS_WAIT_SECONDS`, and a checkpoint every `_CHECKPOINT_EVERY` transactions (SQLite's own automatic checkpoint
is off: it would run inside whichever commit crossed its threshold). When messages come one at a time, each costs
one SQLite statement (its INSERT) on its way out; a 100-row removal batch took 0.18 ms with cold caches here, which
in the commit was added to one message in a hundred, the p99. After a crash of the supervisor, what was confirmed
in its last second is delivered once more.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contracts import Publish
from supervisor.errors import OutboxInUseError, StartupError

log = logging.getLogger("supervisor")

REMOVALS_WAIT_SECONDS = 1.0
REMOVALS_BATCH = 100
# Transactions (of a page or more each) between checkpoints: short ones without fsync; with fsync, SQLite's default.
_CHECKPOINT_EVERY = {"OFF": 100, "NORMAL": 1000, "FULL": 1000}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS publications (
    id INTEGER PRIMARY KEY,
    worker TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    expiry INTEGER,
    local_only INTEGER NOT NULL,
    publication_id TEXT
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    worker TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    expiry INTEGER,
    local_only INTEGER NOT NULL,
    publication_id TEXT,
    reason TEXT NOT NULL,
    time TEXT NOT NULL
)
"""


class Outbox:
    """Durable publications: the rows added during a wake-up are written together by `commit`."""

    def __init__(self, path: Path, synchronous: str = "OFF", clock: Callable[[], float] = time.monotonic) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        try:
            self._db, self.backlog, self._next_row = _open(path, synchronous)
        except sqlite3.DatabaseError as exc:  # not OutboxInUseError: a file in use is left alone
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            log.error("the outbox %s is unreadable (%s); moved to %s, starting with an empty one", path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{path}{suffix}").rename(f"{aside}{suffix}")
            self._db, self.backlog, self._next_row = _open(path, synchronous)
        self._additions: list[tuple[int, str, str, bytes, int, bool, int | None, bool, str]] = []
        self._removals: list[tuple[int]] = []
        self._removals_since = 0.0  # when the oldest removal not yet written was asked for
        self._checkpoint_every = _CHECKPOINT_EVERY[synchronous]
        self._transactions = 0  # since the last checkpoint

    def add(self, worker: str, publication: Publish, publication_id: str) -> int:
        """Store `publication` (durable once `commit` returns); returns its row id."""
        row = self._next_row
        self._next_row += 1
        p = publication
        self._additions.append(
            (row, worker, p.topic, p.payload, p.qos, p.retain, p.expiry, p.local_only, publication_id)
        )
        self.backlog += 1
        return row

    def remove(self, row: int) -> None:
        """Forget row `row`: everyone it was for has it. Written by a later `tidy` (see the module docstring)."""
        if not self._removals:
            self._removals_since = self._clock()
        self._removals.append((row,))
        self.backlog -= 1

    def commit(self) -> None:
        """Write every row added so far (durable when this returns): one statement for a single row."""
        additions = self._additions
        if len(additions) == 1:
            self._db.execute(_INSERT, additions[0])  # a transaction of its own (autocommit)
            additions.clear()
            self._transactions += 1
        elif additions:
            self._write_all(_INSERT, additions)

    def tidy(self) -> None:
        """Write the removals once they are due, and checkpoint the write-ahead log once that is due."""
        removals = self._removals
        if len(removals) >= REMOVALS_BATCH or (
            removals and self._clock() - self._removals_since >= REMOVALS_WAIT_SECONDS
        ):
            self._write_all(_DELETE, removals)
        if self._transactions >= self._checkpoint_every:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._transactions = 0

    def quarantine(self, row: int, reason: str) -> None:
        """Keep a copy of row `row`, which the broker refused (or dropped the connection for), in the quarantine
        table, for a person to look at; the row itself is removed as usual once nobody waits for it."""
        self.commit()
        self._db.execute(
            "INSERT OR REPLACE INTO quarantine SELECT id, worker, topic, payload, qos, retain, expiry, local_only, "
            "publication_id, ?, datetime('now') FROM publications WHERE id = ?",
            (reason, row),
        )
        self._transactions += 1

    def quarantined(self) -> list[tuple[str, str, str]]:
        """(topic, reason, time) of every quarantined publication, oldest first."""
        return list(self._db.execute("SELECT topic, reason, time FROM quarantine ORDER BY id"))

    def pending(self) -> list[tuple[int, str, Publish, str | None]]:
        """Every stored publication with its row, publisher and publication id (None in rows written before ids
        were kept), oldest first: what a previous run left undelivered."""
        rows = self._db.execute(
            "SELECT id, worker, topic, payload, qos, retain, expiry, local_only, publication_id "
            "FROM publications ORDER BY id"
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
                publication_id,
            )
            for row, worker, topic, payload, qos, retain, expiry, local_only, publication_id in rows
        ]

    def close(self) -> None:
        self.commit()
        if self._removals:
            self._write_all(_DELETE, self._removals)
        self._db.close()

    def _write_all(self, statement: str, rows: list[Any]) -> None:
        """Run `statement` for every one of `rows` in one transaction, then forget them."""
        self._db.execute("BEGIN")
        self._db.executemany(statement, rows)
        self._db.execute("COMMIT")
        rows.clear()
        self._transactions += 1


_INSERT = (
    "INSERT INTO publications (id, worker, topic, payload, qos, retain, expiry, local_only, publication_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_DELETE = "DELETE FROM publications WHERE id = ?"


_COLUMNS = {"id", "worker", "topic", "payload", "qos", "retain", "expiry", "local_only", "publication_id"}


def _open(path: Path, synchronous: str) -> tuple[sqlite3.Connection, int, int]:
    """The connection, how many rows it holds, and the id for the next row. Raises sqlite3.DatabaseError for a file
    that is not a database (to be moved aside), StartupError for one that cannot be used as it is."""
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=0)
    except sqlite3.OperationalError as exc:
        raise StartupError(f"cannot open the outbox {path}: {exc}") from None
    try:
        db.execute("PRAGMA locking_mode=EXCLUSIVE")  # held from the first read below until the connection closes
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA wal_autocheckpoint=0")  # `tidy` checkpoints, outside the commits
        db.executescript(_SCHEMA)
        columns = {name for _, name, *_ in db.execute("PRAGMA table_info(publications)")}
        if "publication_id" not in columns:  # an outbox written by a version without publication ids
            db.execute("ALTER TABLE publications ADD COLUMN publication_id TEXT")
            columns.add("publication_id")
        if not columns >= _COLUMNS:
            raise StartupError(
                f"the outbox {path} is not this version's: its table publications has the columns "
                f"{', '.join(sorted(columns))}, expected {', '.join(sorted(_COLUMNS))}; move it aside to start "
                "with an empty one"
            )
        count, last = db.execute("SELECT count(*), coalesce(max(id), 0) FROM publications").fetchone()
    except StartupError:
        db.close()
        raise
    except sqlite3.OperationalError as exc:
        db.close()
        if "locked" in str(exc):
            raise OutboxInUseError(str(path)) from None
        raise StartupError(f"cannot use the outbox {path}: {exc}") from None
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db, count, last + 1
