"""The worker side of the pipe: the loop that runs inside each worker process.

It builds the worker from its spec, runs `on_start`, then handles one message at a time, runs the worker's timers
between messages, heartbeats while idle, and sends what the worker publishes back to the supervisor.

Failure policy (written here because it is implemented here):
- an exception from `on_message` or from a timer callback is reported as an error of kind `handler`, logged with its
  traceback, and the loop goes on;
- an exception from `on_start` is a crash: it is reported, and the process exits with EXIT_START_FAILED so the
  supervisor applies the worker's restart policy;
- the end of the pipe means the supervisor is gone: the worker runs `on_stop` and exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from contracts import (
    ErrorReported,
    Handled,
    Heartbeat,
    Inbound,
    Message,
    Outbound,
    Publish,
    Started,
    Stop,
    Timer,
    Worker,
)
from supervisor.channel import Channel, ChannelClosed
from supervisor.loop import Loop

EXIT_START_FAILED = 3
# What a handler raises when a payload is not what it expects: counted as `decode` errors, not handler failures.
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, json.JSONDecodeError, UnicodeDecodeError)
_PR_SET_PDEATHSIG = 1
_FLUSH_AFTER_SECONDS = 0.002


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a new worker process needs to build its worker; pickled to the process at start."""

    name: str
    module: str
    qualname: str
    config: bytes  # the worker's Config Struct, msgpack-encoded
    state_dir: str
    log_level: str
    heartbeat_seconds: float
    release_fds: list[int] = msgspec.field(default_factory=list)  # the supervisor's, inherited through fork


def run(spec: WorkerSpec, sock: Any) -> None:
    """Entry point of a worker process (the target passed to multiprocess)."""
    _release(spec.release_fds)
    _reset_signals()
    _die_with_parent()
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s %(levelname)s worker {spec.name}[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    worker_class = getattr(importlib.import_module(spec.module), spec.qualname)
    worker = worker_class()
    worker.config = msgspec.msgpack.decode(spec.config, type=worker_class.Config)
    try:
        code = WorkerLoop(spec, worker, Channel(sock, Inbound)).run()
    except ChannelClosed:
        code = 0  # the supervisor went away while we were writing to it
    sys.exit(code)


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


def _reset_signals() -> None:
    """Signal handling of a worker: SIGTERM ends it, SIGINT (Ctrl-C reaches the whole group) is the supervisor's."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when our parent (the supervisor, or the forkserver) dies."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: the end of the pipe still stops the worker between messages
    if os.getppid() != parent:
        os._exit(0)  # the parent died before prctl took effect


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


class WorkerContext:
    """The `contracts.Context` a worker is given; what it publishes is collected in `outgoing`.

    Timer callbacks run on the worker's loop between messages; an exception from one is counted as a `handler`
    error and survived, as for message handlers.
    """

    def __init__(
        self, name: str, config: Any, state_dir: Path, loop: Loop, clock: Callable[[], float] = time.time
    ) -> None:
        self.name = name
        self.config = config
        self.state_dir = state_dir
        self.log = logging.getLogger(f"workers.{name}")
        self.outgoing: list[Outbound] = []
        self._loop = loop
        self._clock = clock

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

    def _guarded(self, callback: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                callback()
            except Exception as exc:  # policy: as for handlers, counted and survived
                self.log.exception("timer callback failed")
                self.report_error("handler", f"{type(exc).__name__}: {exc} (timer)")

        return run


class WorkerLoop:
    """Runs one worker: start, then messages and timers one at a time, then stop."""

    def __init__(self, spec: WorkerSpec, worker: Worker, channel: Channel[Inbound]) -> None:  # type: ignore[type-arg]
        state_dir = Path(spec.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.worker = worker
        self.channel = channel
        self.loop = Loop()
        self.ctx = WorkerContext(spec.name, worker.config, state_dir, self.loop)
        self.log = self.ctx.log
        self._last_sent = time.monotonic()
        self._exit_code: int | None = None

    def run(self) -> int:
        try:
            self.worker.on_start(self.ctx)
        except Exception as exc:  # policy: a failing start is a crash, restarted by the supervisor
            self.log.exception("on_start failed")
            self.ctx.report_error("start", f"{type(exc).__name__}: {exc}")
            self._flush()
            return EXIT_START_FAILED
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
        try:
            self.worker.on_message(self.ctx, message)
        except _UNDECODABLE as exc:  # policy: bad input is counted as `decode`, logged and dropped
            failed = True
            self.ctx.report_error("decode", f"cannot decode the payload on {message.topic}: {exc}")
        except Exception as exc:  # policy: a handler exception is counted and the worker goes on
            failed = True
            self.log.exception("handling message %d on %s failed", message.id, message.topic)
            self.ctx.report_error("handler", f"{type(exc).__name__}: {exc} (topic {message.topic})")
        finished = time.perf_counter()
        self.ctx.outgoing.append(Handled(id=message.id, seconds=finished - started, failed=failed))
        if finished - started >= _FLUSH_AFTER_SECONDS:
            self._flush()  # a slow handler should not hold back what it published

    def _stop(self) -> None:
        try:
            self.worker.on_stop(self.ctx)
        except Exception as exc:  # policy: a failing stop is reported; the process still exits normally
            self.log.exception("on_stop failed")
            self.ctx.report_error("stop", f"{type(exc).__name__}: {exc}")
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
