"""Worker processes: start one through the multiprocess start method, talk to it over its channel, end it.

A `WorkerProcess` is one incarnation: the process, the supervisor's end of its socket pair, and its exit status.
Restarting a worker means starting a new `WorkerProcess`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from contracts import Outbound, Site, Stop
from supervisor import registry, worker_process
from supervisor.channel import Channel
from supervisor.config import WorkerSettings
from supervisor.worker_loop import WorkerSpec

log = logging.getLogger(__name__)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Variables a worker must never see: only the supervisor talks to systemd.
_PRIVATE_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`); a no-op where it does not exist."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _prepare_shared_state() -> None:
    """Do once, before any fork, what each worker making HTTP requests would otherwise do for itself on its first:
    import the idna codec (name lookups encode host names with it) and build urllib's default opener. Done here,
    both stay shared with every forked worker (1.1 and 0.6 MiB less in each such worker, measured)."""
    import encodings.idna  # noqa: F401
    import urllib.request

    urllib.request.install_opener(urllib.request.build_opener())


def start_method_context(method: str, preload: list[str]) -> Any:
    """The multiprocess context for `method`; a forkserver preloads `preload` (the worker-side modules, workers').

    systemd's variables are removed from this process's environment first, so no worker inherits them.

    Under "fork" a worker starts as a copy of the supervisor. That is safe only because the supervisor runs one
    thread (no lock can be held by a thread that does not exist in the child; `WorkerProcess` checks) and because
    the child releases every descriptor the supervisor passes it before running any worker code: a worker holding
    the MQTT socket open would keep the broker from ever sending the will.
    """
    import multiprocess

    for name in _PRIVATE_ENVIRONMENT:
        os.environ.pop(name, None)
    context = multiprocess.get_context(method)
    if method == "fork":
        _prepare_shared_state()
    if method == "forkserver":
        context.set_forkserver_preload(preload)
    return context


def shared_word(context: Any) -> Any:
    """A 64-bit integer in memory shared with the worker processes started from `context` (any start method)."""
    return context.RawValue(ctypes.c_int64, 0)


@dataclass(frozen=True)
class ExitStatus:
    """How a worker process ended: `code` for exit(code), `signal` when killed by a signal."""

    code: int | None
    signal: int | None

    @property
    def abnormal(self) -> bool:
        return self.code != 0

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        return f"exit code {self.code}"


class WorkerProcess:
    """One running incarnation of a worker."""

    def __init__(
        self,
        context: Any,
        settings: WorkerSettings,
        site: Site,
        state_dir: str,
        log_level: str,
        inherited: list[int],
        in_handler: Any,
        mqtt_log_level: str = "OFF",
    ) -> None:
        """Start the worker. `inherited`: the supervisor's descriptors, which a forked child must release;
        `in_handler`: the shared word in which the worker keeps the id of the message it is handling (see
        `supervisor.worker_loop`), made by `shared_word`; `mqtt_log_level`: its lines from this level on go to
        the supervisor too (`supervisor.logrelay`)."""
        ours, theirs = socket.socketpair()
        forked = context.get_start_method() == "fork"
        if forked:
            # Everything alive now leaves the collector's view, in the child too: its collections never touch
            # (and so never copy) the pages it shares with the supervisor. Free heap pages go back to the system
            # first, so no worker starts with a share of them.
            gc.freeze()
            _trim_heap()
        if forked and threading.active_count() > 1:
            ours.close()
            theirs.close()
            raise RuntimeError(
                f"cannot fork worker {settings.name}: the supervisor runs {threading.active_count()} threads, "
                "and forking a threaded process can leave the child with locks nobody will release"
            )
        cls = settings.worker_class
        spec = WorkerSpec(
            name=settings.name,
            title=settings.title,
            module=cls.__module__,
            # A forked child holds the supervisor's version of the module; a forkserver's, the one it preloaded.
            module_mtime_ns=registry.loaded_mtime(cls.__module__, first=not forked),
            qualname=cls.__qualname__,
            config=msgspec.msgpack.encode(settings.config),
            state_dir=state_dir,
            log_level=log_level,
            # Three heartbeats per timeout (every 10 s by default): an idle worker wakes, and wakes the supervisor, no
            # more often.
            heartbeat_seconds=settings.supervision.heartbeat_timeout_seconds / 3,
            site=site,
            release_fds=[*inherited, ours.fileno()] if forked else [],
            environment={name: secret.reveal() for name, secret in settings.environment.items()},
            memory_limit_mb=settings.memory_limit_mb,
            cpu_nice=settings.supervision.cpu_nice,
            max_open_files=settings.supervision.max_open_files,
            mqtt_log_level=mqtt_log_level,
        )
        in_handler.value = 0
        self.in_handler = in_handler
        self.start_error: str | None = None  # what the worker reported when its on_start raised
        self.limit_reached: str | None = None  # the limit it reported reaching (it exits next)
        self.process = context.Process(
            target=worker_process.run, args=(spec, theirs, in_handler), name=f"worker-{settings.name}"
        )
        try:
            self.process.start()
        finally:
            theirs.close()
        self.channel: Channel[Outbound] = Channel(ours, Outbound)
        self.pid: int = self.process.pid
        self.sentinel: int = self.process.sentinel

    def stop(self) -> None:
        """Ask the worker to finish its current message, run `on_stop` and exit."""
        self.channel.send([Stop()])

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    @property
    def message_in_handler(self) -> int:
        """The id of the message the worker is handling (after its death: was handling), 0 for none."""
        return int(self.in_handler.value)

    def resident_bytes(self) -> int:
        """Its resident memory now (0 once it is gone)."""
        try:
            return int(Path(f"/proc/{self.pid}/statm").read_text().split()[1]) * _PAGE_SIZE
        except (OSError, IndexError, ValueError):
            return 0

    def exit_status(self) -> ExitStatus | None:
        """The exit status once the process has ended (reaping it), else None."""
        self.process.join(0)
        code = self.process.exitcode
        if code is None:
            return None
        return ExitStatus(code=None, signal=-code) if code < 0 else ExitStatus(code=code, signal=None)

    def close(self) -> None:
        self.channel.close()
        self.process.close()

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # already gone: its exit status comes through the sentinel
            os.kill(self.pid, signum)
