"""The worker side of the pipe: the loop that runs inside each worker process.

It builds the worker from its spec, runs `on_start`, then handles one message at a time, runs the worker's timers
between messages, heartbeats while idle, and sends what the worker publishes back to the supervisor.

Failure policy (written here because it is implemented here):
- an exception from `on_message`, `on_command`, a timer callback or a `run_in_thread` result callback is reported as
  an error of kind `handler`, logged with its traceback, and the loop goes on;
- an exception from `on_start` is a crash: it is reported over the channel (`StartFailed`), and the process exits
  with code 1 so the supervisor applies the worker's restart policy. The exit code is never read as a message: a
  worker's own `sys.exit(3)` is a crash with exit code 3;
- the end of the pipe means the supervisor is gone: the worker runs `on_stop` and exits;
- MemoryError anywhere (the worker's memory limit, see `_apply_limits`) ends the process with `LimitReached`.

Blame: before each handler call the loop writes the message's id into `in_handler`, a word of memory shared with
the supervisor, and clears it after (no system call). When the process dies, the supervisor reads it: the message
there, if any, is the one that may have killed it; nothing else is blamed.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import resource
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from contracts import (
    RESTART_COMMAND,
    Command,
    EntitiesDeclared,
    ErrorReported,
    Handled,
    Heartbeat,
    Inbound,
    LimitReached,
    Message,
    Outbound,
    Publish,
    Site,
    Started,
    StartFailed,
    StatusReported,
    Stop,
    Subscribe,
    Timer,
    Trigger,
    Worker,
    WorkerFacts,
)
from contracts.homeassistant import RESERVED_OBJECT_IDS, Availability, Button, Entity, declared
from contracts.topics import publish_topic_problem
from supervisor import secrets
from supervisor.channel import Channel, ChannelClosed
from supervisor.loop import Loop
from supervisor.router import InvalidTopicFilter, check_filter

T = TypeVar("T")

# What a handler raises when a payload is not what it expects: counted as `decode` errors, not handler failures.
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, json.JSONDecodeError, UnicodeDecodeError)
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_FLUSH_AFTER_SECONDS = 0.002
_THREADS = 4  # background threads per worker for `run_in_thread`, started on first use


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a new worker process needs to build its worker; pickled to the process at start."""

    name: str
    module: str
    qualname: str
    config: bytes  # the worker's Config Struct, msgpack-encoded
    state_dir: str
    log_level: str
    heartbeat_seconds: float
    site: Site = Site()
    release_fds: list[int] = msgspec.field(default_factory=list)  # the supervisor's, inherited through fork
    environment: dict[str, str] = msgspec.field(default_factory=dict)  # the secrets its section names
    memory_limit_mb: int | None = None
    cpu_nice: int | None = None
    max_open_files: int | None = None


def run(spec: WorkerSpec, sock: Any, in_handler: Any) -> None:
    """Entry point of a worker process (the target passed to multiprocess). `in_handler` is the shared word (a
    ctypes value with `.value`) that holds the id of the message in the handler, 0 between messages."""
    _release(spec.release_fds)
    secrets.forget_inherited()  # a forked worker holds a copy of every secret of the supervisor: drop them first
    os.environ.update(spec.environment)  # in this process's memory only, not its /proc environ
    _apply_limits(spec)
    _reset_signals()
    _die_with_parent()
    name_process(spec.name, f"mqtt-home-supervisor: {spec.name}")
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s %(levelname)s worker {spec.name}[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    worker_class = getattr(importlib.import_module(spec.module), spec.qualname)
    worker = worker_class()
    worker.config = msgspec.msgpack.decode(spec.config, type=worker_class.Config)
    worker.site = spec.site
    channel: Channel[Inbound] = Channel(sock, Inbound)
    try:
        code = WorkerLoop(spec, worker, channel, in_handler).run()
    except ChannelClosed:
        code = 0  # the supervisor went away while we were writing to it
    except MemoryError:  # policy: the memory limit is reached; what held the memory is gone with the loop's frames
        del worker
        code = 1
        with contextlib.suppress(Exception):
            channel.send([LimitReached(limit=f"memory_limit_mb = {spec.memory_limit_mb}")])
    # Exit now: a `run_in_thread` call still under way (an HTTP request waiting for its timeout) must not hold the
    # process, and everything the worker sent is already written.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


def _release(fds: list[int]) -> None:
    """Let go of descriptors inherited from the supervisor (its MQTT socket, its selector, other workers' pipes).

    Each is pointed at /dev/null rather than closed, so that its number stays taken: the inherited Python objects
    that wrap these numbers can then never close a file this worker opens later under the same number.
    """
    if not fds:
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.dup2(null, fd)
    os.close(null)


def _apply_limits(spec: WorkerSpec) -> None:
    """The worker's resource limits, set in its own process before any worker code runs.

    Memory: RLIMIT_DATA (private writable memory: heap, anonymous mappings, thread stacks) at what the process has
    at start plus `memory_limit_mb`. A forked worker starts with a private copy of the supervisor's data mappings,
    so a plain limit of `memory_limit_mb` could fail it at once; this bounds what it adds. An allocation past it
    raises MemoryError, which ends the worker with `LimitReached` (restart reason `memory`). The supervisor also
    kills a worker whose resident memory passes the limit (see `supervisor.core`).
    """
    if spec.memory_limit_mb is not None:
        start = _status_kib("VmData") * 1024
        limit = start + spec.memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    if spec.cpu_nice:
        os.nice(spec.cpu_nice)
    if spec.max_open_files is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (spec.max_open_files, spec.max_open_files))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _reset_signals() -> None:
    """Signal handling of a worker: SIGTERM ends it; SIGINT (Ctrl-C reaches the whole group) and SIGHUP (a terminal
    hanging up) are the supervisor's."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when our parent (the supervisor, or the forkserver) dies."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: the end of the pipe still stops the worker between messages
    if os.getppid() != parent:
        os._exit(0)  # the parent died before prctl took effect


def name_process(name: str, title: str | None = None) -> None:
    """Show `name` as this process's name in top, htop and `ps -o comm` (Linux keeps 15 bytes of it), and `title`
    as its command line in `ps aux`: written over the process's own argument area, which /proc/<pid>/cmdline
    shows (what setproctitle does, for a title that fits in the original command line)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name.encode()[:15])
    if title is None:
        return
    try:  # fields 48 and 49 of /proc/self/stat: where the argument area starts and ends
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])
    except (OSError, IndexError, ValueError):
        return
    data = title.encode()[: end - start - 1]
    if start and end > start:
        ctypes.memmove(start, data, len(data))
        ctypes.memset(start + len(data), 0, end - start - len(data))


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
        self._loop = loop
        loop.add_reader(self._wake_read, self._deliver)

    def submit(self, work: Callable[[], T], then: Callable[[Future[T]], None]) -> None:
        future = self._pool.submit(work)
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
        self.title = title  # the worker class's, for its Home Assistant device
        self.config = config
        self.state_dir = state_dir
        self.site = site or Site()
        self.log = logging.getLogger(f"workers.{name}")
        self.outgoing: list[Outbound] = []
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
    ) -> None:
        facts = WorkerFacts(
            last_run_ts=last_run_ts,
            last_run_trigger=last_run_trigger,
            last_run_ok=last_run_ok,
            interval_seconds=interval_seconds,
            ai_enabled=ai_enabled,
            ai_model=ai_model,
            event_count=event_count,
        )
        self.outgoing.append(StatusReported(facts=facts))

    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        try:
            check_filter(topic_filter)
        except InvalidTopicFilter as exc:
            raise ValueError(str(exc)) from None
        if qos not in (0, 1, 2):
            raise ValueError(f"subscribe({topic_filter!r}): expected qos 0, 1 or 2, got {qos}")
        self.outgoing.append(Subscribe(topic_filter=topic_filter, qos=qos))

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
                raise  # the memory limit: the worker ends (see `run`)
            except Exception as exc:  # policy: as for handlers, counted and survived
                self.log.exception("%s callback failed", what)
                self.report_error("handler", f"{type(exc).__name__}: {exc} ({what})")

        return run


class WorkerLoop:
    """Runs one worker: start, then messages and timers one at a time, then stop."""

    def __init__(
        self,
        spec: WorkerSpec,
        worker: Worker,  # type: ignore[type-arg]
        channel: Channel[Inbound],
        in_handler: Any,
    ) -> None:
        state_dir = Path(spec.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.worker = worker
        self.channel = channel
        self.in_handler = in_handler
        self.loop = Loop()
        self.ctx = WorkerContext(spec.name, worker.config, state_dir, self.loop, spec.site, title=type(worker).title)
        self.log = self.ctx.log
        self._commands = spec.site.command_topic(spec.name, "")
        self._last_sent = time.monotonic()
        self._exit_code: int | None = None

    def run(self) -> int:
        try:
            self.worker.on_start(self.ctx)
        except MemoryError:
            raise  # the memory limit: the worker ends (see `run`)
        except Exception as exc:  # policy: a failing start is a crash, restarted by the supervisor
            self.log.exception("on_start failed")
            self.ctx.outgoing.append(StartFailed(error=f"{type(exc).__name__}: {exc}"))
            self._flush()
            return 1
        self.ctx.outgoing.append(Started(pid=os.getpid()))
        self._flush()
        self.loop.add_reader(self.channel, self._readable)
        self.loop.after_wakeup(self._flush)
        self.ctx.every(self.spec.heartbeat_seconds, self._heartbeat)
        while self._exit_code is None:
            self.loop.run_once(max_wait=self.spec.heartbeat_seconds)
        return self._exit_code

    def _readable(self) -> None:
        for envelope in self.channel.receive():
            match envelope:
                case Message():
                    self._handle(envelope)
                case Stop():
                    self._stop()
                    return
        if self.channel.closed:
            self.log.info("the supervisor is gone; stopping")
            self._stop()
            return
        self._flush()  # report handled messages before a timer callback gets a chance to hang or crash

    def _heartbeat(self) -> None:
        if time.monotonic() - self._last_sent >= self.spec.heartbeat_seconds:
            self.ctx.outgoing.append(Heartbeat())

    def _handle(self, message: Message) -> None:
        started = time.perf_counter()
        failed = False
        self.in_handler.value = message.id
        try:
            if message.topic.startswith(self._commands):
                self._command(message)
            else:
                self.worker.on_message(self.ctx, message)
        except MemoryError:
            raise  # the memory limit: the worker ends (see `run`), blamed on this message
        except _UNDECODABLE as exc:  # policy: bad input is counted as `decode`, logged and dropped
            failed = True
            self.ctx.report_error("decode", f"cannot decode the payload on {message.topic}: {exc}")
        except Exception as exc:  # policy: a handler exception is counted and the worker goes on
            failed = True
            self.log.exception("handling message %d on %s failed", message.id, message.topic)
            self.ctx.report_error("handler", f"{type(exc).__name__}: {exc} (topic {message.topic})")
        self.in_handler.value = 0
        finished = time.perf_counter()
        self.ctx.outgoing.append(Handled(id=message.id, seconds=finished - started, failed=failed))
        if finished - started >= _FLUSH_AFTER_SECONDS:
            self._flush()  # a slow handler should not hold back what it published

    def _command(self, message: Message) -> None:
        name = message.topic[len(self._commands) :]
        if name != RESTART_COMMAND:  # the supervisor's own: it restarts this process
            self.worker.on_command(self.ctx, Command(name=name, payload=message.payload))

    def _stop(self) -> None:
        try:
            self.worker.on_stop(self.ctx)
        except Exception as exc:  # policy: a failing stop is reported; the process still exits normally
            self.log.exception("on_stop failed")
            self.ctx.report_error("stop", f"{type(exc).__name__}: {exc}")
        self.ctx.close()
        self._flush()
        self._exit_code = 0

    def _flush(self) -> None:
        """Send everything the worker queued, blocking while the supervisor's side of the pipe is full."""
        if self.ctx.outgoing:
            self.channel.send(self.ctx.outgoing)
            self.ctx.outgoing.clear()
            self._last_sent = time.monotonic()
        while not self.channel.flush():
            select.select([], [self.channel], [])
