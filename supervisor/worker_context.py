"""Inside a worker process: the `contracts.Context` a worker is given (`WorkerContext`), its timers and threads.

What the worker publishes, reports and declares is collected in `outgoing` as envelopes, which the worker loop
sends to the supervisor between messages. Timer callbacks and `run_in_thread` result callbacks run on the worker's
loop between messages; an exception from one is counted as a `handler` error and survived, as for message handlers.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, get_args

import msgspec

from contracts import (
    EntitiesDeclared,
    ErrorReported,
    Outbound,
    Publish,
    Site,
    StatusReported,
    Subscribe,
    Subscription,
    Timer,
    Trigger,
    WorkerFacts,
)
from contracts.handling import Handlers
from contracts.homeassistant import RESERVED_OBJECT_IDS, Availability, Button, Entity, declared
from contracts.topics import InvalidTopicFilter, check_filter, publish_topic_problem
from supervisor.loop import Loop

T = TypeVar("T")

_THREADS = 4  # background threads per worker for `run_in_thread`, started on first use
_MAX_STATUS_FIELDS_BYTES = 4096  # a worker's own status fields, encoded as JSON


def status_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A worker's own status fields, checked: plain JSON values (numbers, text, booleans, None, lists and mappings
    of them), small. Raises ValueError."""
    try:
        encoded = msgspec.json.encode(fields)
    except (TypeError, msgspec.EncodeError) as exc:
        raise ValueError(f"report_status(): expected plain values (numbers, text, lists, mappings): {exc}") from None
    if len(encoded) > _MAX_STATUS_FIELDS_BYTES:
        raise ValueError(f"report_status(): the fields take {len(encoded)} bytes as JSON; at most 4096")
    return msgspec.json.decode(encoded)  # type: ignore[no-any-return]


class _Repeating:
    """A callback run every `seconds` on the worker's loop until cancelled."""

    def __init__(self, loop: Loop, seconds: float, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._seconds = seconds
        self._callback = callback
        self._next = loop.call_later(seconds, self._run)

    def _run(self) -> None:
        self._next = self._loop.call_later(self._seconds, self._run)  # before the callback, which may cancel us
        self._callback()

    def cancel(self) -> None:
        self._next.cancel()


class _Threads:
    """A small thread pool whose results come back to the worker's loop: a finished future is queued, and a byte on
    a socket pair wakes the loop to hand it to its callback."""

    def __init__(self, loop: Loop) -> None:
        self._pool = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="worker-io")
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._done: deque[tuple[Future[Any], Callable[[Future[Any]], None]]] = deque()  # appended by threads
        self.busy = 0  # work submitted whose callback has not run yet
        self._loop = loop
        loop.add_reader(self._wake_read, self._deliver)

    def submit(self, work: Callable[[], T], then: Callable[[Future[T]], None]) -> None:
        future = self._pool.submit(work)
        self.busy += 1
        future.add_done_callback(lambda f: self._finished(f, then))  # runs on the pool's thread

    def _finished(self, future: Future[Any], then: Callable[[Future[Any]], None]) -> None:
        self._done.append((future, then))  # deque.append and popleft are thread-safe
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")

    def _deliver(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_read.recv(4096)
        while self._done:
            future, then = self._done.popleft()
            self.busy -= 1
            then(future)

    def close(self) -> None:
        """Stop taking work; threads still running are abandoned (the process exits without waiting for them)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._loop.remove_reader(self._wake_read)
        self._wake_read.close()
        self._wake_write.close()


class WorkerContext:
    """The `contracts.Context` a worker is given; what it publishes is collected in `outgoing`.

    Timer callbacks and `run_in_thread` result callbacks run on the worker's loop between messages; an exception
    from one is counted as a `handler` error and survived, as for message handlers.
    """

    def __init__(
        self,
        name: str,
        config: Any,
        state_dir: Path,
        loop: Loop,
        site: Site | None = None,
        clock: Callable[[], float] = time.time,
        title: str | None = None,
    ) -> None:
        self.name = name
        self.title = title  # how a person reads its name (`WorkerSettings.title`), for its Home Assistant device
        self.config = config
        self.state_dir = state_dir
        self.site = site or Site()
        self.log = logging.getLogger(f"workers.{name}")
        self.outgoing: list[Outbound] = []
        self.handlers = Handlers()  # the typed handlers of its subscriptions, those made while it runs too
        self._loop = loop
        self._clock = clock
        self._threads: _Threads | None = None

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 0,
        retain: bool = False,
        expiry: int | None = None,
        local_only: bool = False,
    ) -> None:
        problem = publish_topic_problem(topic)
        if problem is not None:  # the broker would drop the supervisor's connection for it
            self.report_error("publish", f"publication refused: {problem}")
            return
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        self.outgoing.append(
            Publish(topic=topic, payload=data, qos=qos, retain=retain, expiry=expiry, local_only=local_only)
        )

    def report_error(self, kind: str, detail: str) -> None:
        self.log.warning("error (%s): %s", kind, detail)
        self.outgoing.append(ErrorReported(kind=kind, detail=detail))

    def now(self) -> float:
        return self._clock()

    def every(self, seconds: float, callback: Callable[[], None]) -> Timer:
        if seconds <= 0:
            raise ValueError(f"every(): expected seconds > 0, got {seconds}")
        return _Repeating(self._loop, seconds, self._guarded(callback))

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        return self._loop.call_later(seconds, self._guarded(callback))

    def run_in_thread(self, work: Callable[[], T], then: Callable[[Future[T]], None]) -> None:
        if self._threads is None:
            self._threads = _Threads(self._loop)
        self._threads.submit(work, self._guarded_then(then))

    def command_topic(self, command: str) -> str:
        return self.site.command_topic(self.name, command)

    def declare(self, entities: Sequence[Entity]) -> None:
        completed = [self._completed(entity) for entity in entities]
        seen: set[tuple[str, str]] = set()
        for entity in completed:
            key = (entity.component, entity.object_id)
            if key in seen:
                raise ValueError(f"declare(): two {entity.component} entities with object_id {entity.object_id!r}")
            seen.add(key)
        node = self.site.node_id
        declarations = [declared(entity, f"{node}_{entity.object_id}") for entity in completed]
        self.outgoing.append(EntitiesDeclared(entities=declarations))

    def _completed(self, entity: Entity) -> Entity:
        """`entity` with this worker's defaults filled in (see `contracts.Context.declare`)."""
        site, worker = self.site, self.name
        own_commands = self.site.command_topic(worker, "")
        if isinstance(entity, Button) and not entity.command_topic.startswith(own_commands):
            raise ValueError(
                f"button {entity.object_id!r}: command_topic must be one of this worker's, "
                f"ctx.command_topic(<name>) = {own_commands}<name>; got {entity.command_topic!r}"
            )
        if entity.object_id in RESERVED_OBJECT_IDS:
            raise ValueError(
                f"{entity.component} {entity.object_id!r}: the supervisor's own entity of this worker has this "
                f"object_id; reserved: {', '.join(sorted(RESERVED_OBJECT_IDS))}"
            )
        object_id = f"{worker}_{entity.object_id}"
        unique_id = entity.unique_id or f"{site.node_id}_{object_id}"
        changes: dict[str, Any] = {"object_id": object_id, "unique_id": unique_id}
        if entity.device is None:
            changes["device"] = site.worker_device(worker, self.title)
        if entity.origin is None:
            changes["origin"] = site.origin()
        if not entity.availability:
            changes["availability"] = [
                Availability(topic=site.availability_topic),
                Availability(topic=site.worker_availability_topic(worker)),
            ]
            changes["availability_mode"] = "all"
        return msgspec.structs.replace(entity, **changes)

    def report_status(
        self,
        *,
        last_run_ts: float | None = None,
        last_run_trigger: Trigger | None = None,
        last_run_ok: bool | None = None,
        interval_seconds: float | None = None,
        ai_enabled: bool | None = None,
        ai_model: str | None = None,
        event_count: int | None = None,
        **fields: Any,
    ) -> None:
        more = status_fields(fields)
        if last_run_trigger is not None and last_run_trigger not in get_args(Trigger):
            # checked here: the supervisor decodes the facts as typed, and would refuse the whole batch they came in
            expected = ", ".join(get_args(Trigger))
            raise ValueError(f"report_status(): expected last_run_trigger in {expected}, got {last_run_trigger!r}")
        facts = WorkerFacts(
            last_run_ts=last_run_ts,
            last_run_trigger=last_run_trigger,
            last_run_ok=last_run_ok,
            interval_seconds=interval_seconds,
            ai_enabled=ai_enabled,
            ai_model=ai_model,
            event_count=event_count,
            fields=more or None,
        )
        self.outgoing.append(StatusReported(facts=facts))

    def subscribe(self, topic_filter: str | Subscription, qos: int = 0) -> None:
        subscription = topic_filter if isinstance(topic_filter, Subscription) else Subscription(topic_filter, qos)
        where = f"subscribe({subscription.topic_filter!r})"
        try:
            check_filter(subscription.topic_filter)
        except InvalidTopicFilter as exc:
            raise ValueError(str(exc)) from None
        if subscription.qos not in (0, 1, 2):
            raise ValueError(f"{where}: expected qos 0, 1 or 2, got {subscription.qos}")
        if subscription.commands or subscription.local:
            raise ValueError(f"{where}: commands and local filters are made in subscriptions() only")
        self.handlers.add(subscription)
        self.outgoing.append(Subscribe(topic_filter=subscription.topic_filter, qos=subscription.qos))

    def threads_busy(self) -> bool:
        """Whether work given to `run_in_thread` has not come back yet."""
        return self._threads is not None and self._threads.busy > 0

    def close(self) -> None:
        if self._threads is not None:
            self._threads.close()

    def _guarded_then(self, then: Callable[[Future[T]], None]) -> Callable[[Future[T]], None]:
        def run(future: Future[T]) -> None:
            self._guarded(lambda: then(future), "thread result")()

        return run

    def _guarded(self, callback: Callable[[], None], what: str = "timer") -> Callable[[], None]:
        def run() -> None:
            try:
                callback()
            except MemoryError:
                raise  # the memory limit: the worker ends (see `worker_process.run`)
            except Exception as exc:  # policy: as for handlers, counted and survived
                self.log.exception("%s callback failed", what)
                self.report_error("handler", f"{type(exc).__name__}: {exc} ({what})")

        return run
