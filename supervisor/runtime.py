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
import heapq
import importlib
import itertools
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
    Worker,
)
from supervisor.channel import Channel, ChannelClosed

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


class _Timer:
    __slots__ = ("callback", "cancelled", "interval", "when")

    def __init__(self, when: float, interval: float | None, callback: Callable[[], None]) -> None:
        self.when = when
        self.interval = interval
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class WorkerContext:
    """The `contracts.Context` a worker is given; what it publishes is collected in `outgoing`."""

    def __init__(self, name: str, config: Any, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.config = config
        self.state_dir = state_dir
        self.log = logging.getLogger(f"workers.{name}")
        self.outgoing: list[Outbound] = []
        self.timers: list[tuple[float, int, _Timer]] = []
        self._clock = clock
        self._sequence = itertools.count()

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

    def every(self, seconds: float, callback: Callable[[], None]) -> _Timer:
        return self._schedule(seconds, seconds, callback)

    def call_later(self, seconds: float, callback: Callable[[], None]) -> _Timer:
        return self._schedule(seconds, None, callback)

    def _schedule(self, delay: float, interval: float | None, callback: Callable[[], None]) -> _Timer:
        if interval is not None and interval <= 0:
            raise ValueError(f"every(): expected seconds > 0, got {interval}")
        timer = _Timer(time.monotonic() + max(delay, 0.0), interval, callback)
        heapq.heappush(self.timers, (timer.when, next(self._sequence), timer))
        return timer


class WorkerLoop:
    """Runs one worker: start, then messages and timers one at a time, then stop."""

    def __init__(self, spec: WorkerSpec, worker: Worker, channel: Channel[Inbound]) -> None:  # type: ignore[type-arg]
        state_dir = Path(spec.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.worker = worker
        self.channel = channel
        self.ctx = WorkerContext(spec.name, worker.config, state_dir)
        self.log = self.ctx.log
        self._last_sent = time.monotonic()

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
        while True:
            self._wait()
            for envelope in self.channel.receive():
                match envelope:
                    case Message():
                        self._handle(envelope)
                    case Stop():
                        return self._stop()
            if self.channel.closed:
                self.log.info("the supervisor is gone; stopping")
                return self._stop()
            self._flush()  # report handled messages before a timer callback gets a chance to hang or crash
            self._run_due_timers()
            if time.monotonic() - self._last_sent >= self.spec.heartbeat_seconds:
                self.ctx.outgoing.append(Heartbeat())
            self._flush()

    def _wait(self) -> None:
        timeout = self.spec.heartbeat_seconds
        if self.ctx.timers:
            timeout = min(timeout, self.ctx.timers[0][0] - time.monotonic())
        select.select([self.channel], [], [], max(timeout, 0.0))

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

    def _run_due_timers(self) -> None:
        timers = self.ctx.timers
        while timers and timers[0][0] <= time.monotonic():
            _, sequence, timer = heapq.heappop(timers)
            if timer.cancelled:
                continue
            try:
                timer.callback()
            except Exception as exc:  # policy: as for handlers, counted and survived
                self.log.exception("timer callback failed")
                self.ctx.report_error("handler", f"{type(exc).__name__}: {exc} (timer)")
            if timer.interval is not None and not timer.cancelled:
                timer.when = max(timer.when + timer.interval, time.monotonic())
                heapq.heappush(timers, (timer.when, sequence, timer))

    def _stop(self) -> int:
        try:
            self.worker.on_stop(self.ctx)
        except Exception as exc:  # policy: a failing stop is reported; the process still exits normally
            self.log.exception("on_stop failed")
            self.ctx.report_error("stop", f"{type(exc).__name__}: {exc}")
        self._flush()
        return 0

    def _flush(self) -> None:
        """Send everything the worker queued, blocking while the supervisor's side of the pipe is full."""
        if self.ctx.outgoing:
            self.channel.send(self.ctx.outgoing)
            self.ctx.outgoing.clear()
            self._last_sent = time.monotonic()
        while not self.channel.flush():
            select.select([], [self.channel], [])
