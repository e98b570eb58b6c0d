"""The pure bookkeeping behind the delivery guarantees: acknowledgement order, the outbox ledger, a worker's queue."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import pytest
from testworkers.echo import Echo, EchoConfig

from contracts import Inbound, Message, Publish
from contracts.status import WorkerState
from supervisor.config import WorkerSettings, WorkerSupervision
from supervisor.dedupe import Deduplicator, Window
from supervisor.delivery import Deliveries
from supervisor.errors import OutboxInUseError
from supervisor.outbox import REMOVALS_BATCH, REMOVALS_WAIT_SECONDS, Outbox
from supervisor.slot import Offer, WorkerSlot
from supervisor.supervision import RestartTracker


class Recorder:
    def __init__(self) -> None:
        self.acks: list[tuple[int, int]] = []
        self.forgotten: list[int] = []

    def deliveries(self) -> Deliveries:
        return Deliveries(lambda mid, qos: self.acks.append((mid, qos)), self.forgotten.append)


def test_acknowledgements_wait_for_every_earlier_message() -> None:
    r = Recorder()
    d = r.deliveries()
    d.expect_inbound(1, mid=101, qos=1, receivers=2)
    d.expect_inbound(2, mid=102, qos=1, receivers=1)
    d.done(2)
    d.release()
    assert r.acks == []  # 2 is finished, but 1 is not
    d.done(1)
    d.release()
    assert r.acks == []  # 1 still waits for its second receiver
    d.done(1)
    d.release()
    assert r.acks == [(101, 1), (102, 1)]
    assert d.unacknowledged == 0


def test_a_message_routed_to_nobody_is_acknowledged_at_once() -> None:
    r = Recorder()
    d = r.deliveries()
    d.expect_inbound(1, mid=7, qos=2, receivers=0)
    d.release()
    assert r.acks == [(7, 2)]


def test_nothing_from_a_lost_connection_is_acknowledged_on_the_next() -> None:
    r = Recorder()
    d = r.deliveries()
    d.expect_inbound(1, mid=5, qos=1, receivers=1)
    d.connection_lost()
    d.expect_inbound(2, mid=5, qos=1, receivers=1)  # the broker sends it again, perhaps under the same packet id
    d.done(1)
    d.done(2)
    d.release()
    assert r.acks == [(5, 1)]  # once, for the message of the current connection


def test_a_publication_is_forgotten_once_every_part_is_done() -> None:
    r = Recorder()
    d = r.deliveries()
    d.expect_outbound(9, row=42, parts=3)
    d.done(9)
    d.done(9)
    assert r.forgotten == []
    d.done(9)
    assert r.forgotten == [42]


def slot(**policy: object) -> WorkerSlot:
    settings = WorkerSettings(
        name="echo",
        worker_class=Echo,
        supervision=WorkerSupervision(**policy),  # type: ignore[arg-type]
        config=EchoConfig(topics=["t"], out="o"),
    )
    s = WorkerSlot(settings, RestartTracker(settings.supervision, random.Random(1)))
    s.state = WorkerState.RUNNING
    return s


def message(i: int, qos: int = 1) -> Message:
    return Message(id=i, topic="t", payload=b"p", qos=qos)


def ids(envelopes: Iterable[Inbound]) -> list[int | None]:
    """The id of each envelope, in order; None for a Stop, which carries none."""
    return [e.id if isinstance(e, Message) else None for e in envelopes]


def test_only_the_message_in_the_handler_is_blamed_after_a_death() -> None:
    s = slot(max_inflight=2)
    for i in (1, 2, 3):
        s.offer(message(i), now=0.0)
    assert ids(s.outgoing) == [1, 2] and [m.id for m in s.queued] == [3]
    assert s.take_back_unfinished(in_handler=2) is None  # 1 was finished, its report lost with the process
    assert [(m.id, m.attempt, m.crashes) for m in s.queued] == [(1, 2, 0), (2, 2, 1), (3, 1, 0)]


def test_messages_sent_after_the_one_in_hand_were_never_started_and_keep_their_attempt() -> None:
    s = slot(max_inflight=3)
    for i in (1, 2, 3):
        s.offer(message(i), now=0.0)
    assert ids(s.outgoing) == [1, 2, 3]
    assert s.take_back_unfinished(in_handler=2) is None
    assert [(m.id, m.attempt, m.crashes) for m in s.queued] == [(1, 2, 0), (2, 2, 1), (3, 1, 0)]


def test_a_death_between_messages_blames_none() -> None:
    s = slot()
    s.offer(message(1), now=0.0)
    assert s.take_back_unfinished(in_handler=0) is None
    assert [(m.id, m.attempt, m.crashes) for m in s.queued] == [(1, 2, 0)]


def test_a_message_in_hand_at_too_many_deaths_is_given_up_for_dead_lettering() -> None:
    s = slot(dead_letter_after_crashes=2)
    s.offer(message(1), now=0.0)
    s.offer(message(2), now=0.0)
    assert s.take_back_unfinished(in_handler=2) is None  # first death, with 2 in hand
    s.refill(now=1.0)
    poison = s.take_back_unfinished(in_handler=2)  # second death with it in hand
    assert poison is not None and (poison.id, poison.crashes) == (2, 2)
    assert [m.id for m in s.queued] == [1] and s.dead_letters == 1


def test_qos_0_to_a_full_queue_is_dropped_but_qos_1_is_kept() -> None:
    s = slot(max_inflight=1, max_queued=1)
    assert s.offer(message(1, qos=0), now=0.0) is Offer.QUEUED  # in flight
    assert s.offer(message(2, qos=0), now=0.0) is Offer.QUEUED  # queued
    assert s.offer(message(3, qos=0), now=0.0) is Offer.DROPPED
    assert s.offer(message(4, qos=1), now=0.0) is Offer.QUEUED
    assert s.errors["queue_full"] == 1 and s.dropped == 1


def test_a_failed_worker_refuses_and_a_stopping_one_holds() -> None:
    s = slot()
    s.state = WorkerState.FAILED
    assert s.offer(message(1), now=0.0) is Offer.REFUSED
    s.state = WorkerState.STOPPING
    assert s.offer(message(2), now=0.0) is Offer.HELD


def test_overdue_distinguishes_a_stuck_message_from_a_silent_idle_worker() -> None:
    s = slot(message_deadline_seconds=5.0, heartbeat_timeout_seconds=10.0)
    s.process = object()  # type: ignore[assignment]  # only its presence matters here
    assert s.overdue(now=9.0) is None
    assert s.overdue(now=11.0) == ("heartbeat", "sent no heartbeat for 10 s")
    s.last_seen = 11.0
    s.offer(message(1), now=11.0)
    assert s.overdue(now=15.0) is None
    assert s.overdue(now=16.5) == ("deadline", "spent more than 5 s on a message")


def test_a_corrupt_outbox_is_moved_aside_and_a_fresh_one_starts(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not a database, as after a power cut" * 100)
    outbox = Outbox(path)
    assert outbox.backlog == 0
    row = outbox.add("w", Publish(topic="t", payload=b"p", qos=1), "id-1")
    outbox.commit()
    assert [r for r, _, _, _ in outbox.pending()] == [row]
    outbox.close()
    assert len(list(tmp_path.glob("outbox.sqlite3.corrupt-*"))) == 1


def test_the_outbox_keeps_publications_until_removed(tmp_path: Path) -> None:
    first = Outbox(tmp_path / "o.sqlite3")
    kept = first.add("w", Publish(topic="a", payload=b"1", qos=1, retain=True, expiry=60), "kept-id")
    gone = first.add("w", Publish(topic="b", payload=b"2", qos=2, local_only=True), "id")
    first.commit()
    first.remove(gone)
    first.close()
    again = Outbox(tmp_path / "o.sqlite3")
    kept_publication = Publish(topic="a", payload=b"1", qos=1, retain=True, expiry=60)
    assert again.pending() == [(kept, "w", kept_publication, "kept-id")]
    assert again.backlog == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_outbox_removals_are_written_once_the_oldest_has_waited(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = Outbox(tmp_path / "o.sqlite3", clock=clock)
    first = outbox.add("w", Publish(topic="a", payload=b"1", qos=1), "id-a")
    second = outbox.add("w", Publish(topic="b", payload=b"2", qos=1), "id-b")
    outbox.commit()
    outbox.remove(first)
    assert outbox.backlog == 1  # counted at once, whenever it is written
    clock.now = REMOVALS_WAIT_SECONDS / 2
    third = outbox.add("w", Publish(topic="c", payload=b"3", qos=1), "id-c")
    outbox.commit()
    outbox.tidy()
    assert [row for row, _, _, _ in outbox.pending()] == [first, second, third]  # not written yet
    clock.now = REMOVALS_WAIT_SECONDS
    outbox.tidy()
    assert [row for row, _, _, _ in outbox.pending()] == [second, third]


def test_outbox_removals_are_written_as_soon_as_a_batch_is_full(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3", clock=FakeClock())
    rows = [outbox.add("w", Publish(topic="t", payload=b"", qos=1), "id") for _ in range(REMOVALS_BATCH + 1)]
    outbox.commit()
    for row in rows[:-2]:
        outbox.remove(row)
    outbox.tidy()
    assert len(outbox.pending()) == len(rows)  # one short of a batch, and no time has passed
    outbox.remove(rows[-2])
    outbox.tidy()
    assert [row for row, _, _, _ in outbox.pending()] == rows[-1:]


def test_a_commit_writes_the_new_rows_only_and_leaves_due_removals_to_tidy(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = Outbox(tmp_path / "o.sqlite3", clock=clock)
    rows = [outbox.add("w", Publish(topic="t", payload=b"", qos=1), "id") for _ in range(REMOVALS_BATCH)]
    outbox.commit()
    for row in rows:
        outbox.remove(row)
    clock.now = REMOVALS_WAIT_SECONDS  # due twice over: a full batch that has waited
    new = outbox.add("w", Publish(topic="t", payload=b"new", qos=1), "id")
    outbox.commit()  # what the next publication waits for before it leaves: its own row, nothing else
    assert [row for row, _, _, _ in outbox.pending()] == [*rows, new]
    outbox.tidy()
    assert [row for row, _, _, _ in outbox.pending()] == [new]


def test_tidy_checkpoints_so_the_write_ahead_log_stays_small(tmp_path: Path) -> None:
    # SQLite's automatic checkpoint is off (it would run inside a commit); without tidy's, these 1000 one-row
    # transactions would leave a log of 1000 page frames (4 MB).
    outbox = Outbox(tmp_path / "o.sqlite3", clock=FakeClock())
    for _ in range(1000):
        outbox.add("w", Publish(topic="t", payload=bytes(100), qos=1), "id")
        outbox.commit()
        outbox.tidy()
    assert (tmp_path / "o.sqlite3-wal").stat().st_size < 150 * 4096
    outbox.close()


def test_outbox_close_writes_every_removal_and_new_rows_never_reuse_a_stored_id(tmp_path: Path) -> None:
    first = Outbox(tmp_path / "o.sqlite3", clock=FakeClock())
    rows = [first.add("w", Publish(topic=t, payload=b"", qos=1), "id") for t in ("a", "b", "c")]
    first.commit()
    first.remove(rows[0])
    first.remove(rows[2])
    first.close()
    again = Outbox(tmp_path / "o.sqlite3")
    assert [row for row, _, _, _ in again.pending()] == [rows[1]]
    assert again.add("w", Publish(topic="d", payload=b"", qos=1), "id") > rows[1]  # never an id still stored


def test_a_second_outbox_on_the_same_file_is_refused_and_the_file_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    first = Outbox(path)
    row = first.add("w", Publish(topic="a", payload=b"1", qos=1), "id")
    first.commit()
    with pytest.raises(OutboxInUseError, match=r"^the outbox .*outbox\.sqlite3 is in use by another process"):
        Outbox(path)
    assert [r for r, _, _, _ in first.pending()] == [row]
    assert not list(tmp_path.glob("*.corrupt-*"))
    first.close()


def test_an_outbox_written_before_publication_ids_is_upgraded_and_replayed(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE publications (id INTEGER PRIMARY KEY, worker TEXT NOT NULL, topic TEXT NOT NULL, "
        "payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, expiry INTEGER, "
        "local_only INTEGER NOT NULL)"
    )
    old.execute("INSERT INTO publications VALUES (7, 'w', 't', x'70', 1, 0, NULL, 0)")
    old.commit()
    old.close()
    outbox = Outbox(path)
    try:
        assert outbox.pending() == [(7, "w", Publish(topic="t", payload=b"p", qos=1), None)]
        row = outbox.add("w", Publish(topic="u", payload=b"q", qos=1), "new-id")
        outbox.commit()
        assert outbox.pending()[-1] == (row, "w", Publish(topic="u", payload=b"q", qos=1), "new-id")
    finally:
        outbox.close()


# Deduplication ------------------------------------------------------------------------------------------------------


def test_a_handled_publication_is_dropped_within_its_window_and_delivered_after_it(tmp_path: Path) -> None:
    clock = FakeClock()
    dedupe = Deduplicator(tmp_path / "handled.sqlite3", {"w": Window(60.0, 100)}, clock=clock)
    assert dedupe.admit("w", "a")
    assert not dedupe.admit("w", "a")  # held: a copy while the first is in the worker's hands
    dedupe.finished("w", "a", handled=True)
    assert not dedupe.admit("w", "a")
    clock.now = 60.0
    assert dedupe.admit("w", "a")
    dedupe.close()


def test_a_publication_dropped_unhandled_is_delivered_again() -> None:
    dedupe = Deduplicator(Path(":memory:"), {"w": Window(60.0, 100)}, clock=FakeClock())
    assert dedupe.admit("w", "a")
    dedupe.finished("w", "a", handled=False)
    assert dedupe.admit("w", "a")
    dedupe.close()


def test_dedupe_keeps_at_most_its_bound_and_forgets_the_oldest() -> None:
    dedupe = Deduplicator(Path(":memory:"), {"w": Window(60.0, 2)}, clock=FakeClock())
    for publication_id in ("a", "b", "c"):
        assert dedupe.admit("w", publication_id)
        dedupe.finished("w", publication_id, handled=True)
    assert dedupe.admit("w", "a")  # forgotten: the bound is 2
    assert not dedupe.admit("w", "c")
    dedupe.close()


def test_handled_ids_survive_a_restart_of_the_supervisor_within_their_window(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "handled.sqlite3"
    first = Deduplicator(path, {"w": Window(60.0, 100), "v": Window(5.0, 100)}, clock=clock)
    for worker in ("w", "v"):
        first.admit(worker, "a")
        first.finished(worker, "a", handled=True)
    first.commit()
    first._db.close()  # as a kill -9 leaves it: nothing more written
    clock.now = 10.0
    again = Deduplicator(path, {"w": Window(60.0, 100), "v": Window(5.0, 100)}, clock=clock)
    assert not again.admit("w", "a")
    assert again.admit("v", "a")  # its window has passed
    again.close()
