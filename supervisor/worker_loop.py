"""Inside a worker process: the loop that runs the worker (`WorkerLoop`), and how one message is handled
(`Handling`, also used by `supervisor.testing`).

It runs `on_start`, then handles one message at a time, runs the worker's timers between messages, heartbeats
while idle, and sends what the worker publishes back to the supervisor.

Failure policy (written here because it is implemented here): an exception from `on_message`, `on_command`, a
typed handler, a timer callback or a `run_in_thread` result callback is reported as an error of kind `handler`,
logged with its traceback, and the loop goes on; a payload that does not decode is a `decode` error. See
`supervisor.worker_process` for `on_start`, the end of the pipe and the memory limit.

Blame: before each handler call the loop writes the message's id into `in_handler`, a word of memory shared with
the supervisor, and clears it after (no system call). When the process dies, the supervisor reads it: the message
there, if any, is the one that may have killed it; nothing else is blamed.
"""

from __future__ import annotations

import json
import os
import select
import time
from pathlib import Path
from typing import Any

import msgspec

from contracts import (
    RESTART_COMMAND,
    Command,
    Handled,
    Heartbeat,
    Inbound,
    Message,
    Site,
    Started,
    StartFailed,
    Stop,
    Worker,
)
from supervisor.channel import Channel
from supervisor.logrelay import Relay
from supervisor.loop import Loop
from supervisor.worker_context import WorkerContext

# What a handler raises when a payload is not what it expects: counted as `decode` errors, not handler failures.
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, json.JSONDecodeError, UnicodeDecodeError)
_FLUSH_AFTER_SECONDS = 0.002
_MAX_WAIT_SECONDS = 60.0


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a new worker process needs to build its worker; pickled to the process at start."""

    name: str
    title: str  # how a person reads its name (`WorkerSettings.title`)
    module: str
    qualname: str
    config: bytes  # the worker's Config Struct, msgpack-encoded
    state_dir: str
    log_level: str
    heartbeat_seconds: float
    site: Site = Site()
    release_fds: list[int] = msgspec.field(default_factory=list)  # the supervisor's, inherited through fork
    environment: dict[str, str] = msgspec.field(default_factory=dict)  # the secrets its section names
    # When the worker's module file was modified before the supervisor imported it: newer now, the process imports
    # it again, so that a restart runs the code on disk.
    module_mtime_ns: int | None = None
    memory_limit_mb: int | None = None
    cpu_nice: int | None = None
    max_open_files: int | None = None
    mqtt_log_level: str = "OFF"  # its log lines at or above this go to the supervisor too (`supervisor.logrelay`)


class Handling:
    """How one message is handled, by the failure policy: a command goes to `on_command` (the supervisor's own
    restart command to nobody), a message a typed handler takes to it, any other to `on_message`."""

    def __init__(self, worker: Worker, ctx: WorkerContext) -> None:  # type: ignore[type-arg]
        self.worker = worker
        self.ctx = ctx
        self._commands = ctx.site.command_topic(ctx.name, "")
        for subscription in worker.subscriptions():
            ctx.handlers.add(subscription)

    def handle(self, message: Message) -> bool:
        """Handle `message`; True when it failed (an error was counted)."""
        ctx = self.ctx
        try:
            if message.topic.startswith(self._commands):
                self._command(message)
            elif not ctx.handlers.dispatch(ctx, message):
                self.worker.on_message(ctx, message)
        except MemoryError:
            raise  # the memory limit: the worker ends (see `worker_process.run`), blamed on this message
        except _UNDECODABLE as exc:  # policy: bad input is counted as `decode`, logged and dropped
            ctx.report_error("decode", f"cannot decode the payload on {message.topic}: {exc}")
            return True
        except Exception as exc:  # policy: a handler exception is counted and the worker goes on
            ctx.log.exception("handling message %d on %s failed", message.id, message.topic)
            ctx.report_error("handler", f"{type(exc).__name__}: {exc} (topic {message.topic})")
            return True
        return False

    def _command(self, message: Message) -> None:
        name = message.topic[len(self._commands) :]
        if name != RESTART_COMMAND:  # the supervisor's own: it restarts this process
            self.worker.on_command(self.ctx, Command(name=name, payload=message.payload))


class WorkerLoop:
    """Runs one worker: start, then messages and timers one at a time, then stop."""

    def __init__(
        self,
        spec: WorkerSpec,
        worker: Worker,  # type: ignore[type-arg]
        channel: Channel[Inbound],
        in_handler: Any,
        log_relay: Relay | None = None,
    ) -> None:
        state_dir = Path(spec.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.worker = worker
        self.channel = channel
        self.in_handler = in_handler
        self.log_relay = log_relay
        self.loop = Loop()
        self.ctx = WorkerContext(spec.name, worker.config, state_dir, self.loop, spec.site, title=spec.title)
        self.handling: Handling | None = None  # made at start: `subscriptions()` runs then, under the start's policy
        self.log = self.ctx.log
        self._last_sent = time.monotonic()
        self._exit_code: int | None = None

    def run(self) -> int:
        try:
            self.handling = Handling(self.worker, self.ctx)
            self.worker.on_start(self.ctx)
        except MemoryError:
            raise  # the memory limit: the worker ends (see `worker_process.run`)
        except Exception as exc:  # policy: a failing start (subscriptions() or on_start) is a crash, restarted
            self.log.exception("on_start failed")
            self.ctx.outgoing.append(StartFailed(error=f"{type(exc).__name__}: {exc}"))
            self._flush()
            return 1
        self.ctx.outgoing.append(Started(pid=os.getpid()))
        self._flush()
        self.loop.add_reader(self.channel, self._readable)
        self.loop.after_wakeup(self._flush)
        self.loop.call_later(self.spec.heartbeat_seconds, self._heartbeat, aligned=True)
        while self._exit_code is None:
            self.loop.run_once(max_wait=_MAX_WAIT_SECONDS)  # the heartbeat's timer is always there
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
        """On the clock's multiples of the interval (in step with the supervisor's periodic tasks), when the worker
        sent nothing for that long."""
        if time.monotonic() - self._last_sent >= self.spec.heartbeat_seconds * 0.9:
            self.ctx.outgoing.append(Heartbeat())
        self.loop.call_later(self.spec.heartbeat_seconds, self._heartbeat, aligned=True)

    def _handle(self, message: Message) -> None:
        started = time.perf_counter()
        assert self.handling is not None  # messages come only after the start
        self.in_handler.value = message.id
        failed = self.handling.handle(message)
        self.in_handler.value = 0
        finished = time.perf_counter()
        self.ctx.outgoing.append(Handled(id=message.id, seconds=finished - started, failed=failed))
        if finished - started >= _FLUSH_AFTER_SECONDS:
            self._flush()  # a slow handler should not hold back what it published

    def _stop(self) -> None:
        stop(self.worker, self.ctx)
        self._flush()
        self._exit_code = 0

    def _flush(self) -> None:
        """Send everything the worker queued, blocking while the supervisor's side of the pipe is full."""
        logged = self.log_relay.take() if self.log_relay is not None else None
        if logged is not None:
            self.ctx.outgoing.append(logged)
        if self.ctx.outgoing:
            self.channel.send(self.ctx.outgoing)
            self.ctx.outgoing.clear()
            self._last_sent = time.monotonic()
        while not self.channel.flush():
            select.select([], [self.channel], [])


def stop(worker: Worker, ctx: WorkerContext) -> None:  # type: ignore[type-arg]
    """Run `on_stop` by the failure policy (a failing stop is reported; the process still exits normally), then
    let go of the worker's threads."""
    try:
        worker.on_stop(ctx)
    except Exception as exc:
        ctx.log.exception("on_stop failed")
        ctx.report_error("stop", f"{type(exc).__name__}: {exc}")
    ctx.close()
