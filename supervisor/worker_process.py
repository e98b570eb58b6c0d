"""Inside a worker process: how it starts (runs first in the new process) and how it ends.

`run` is the process's entry point: it lets go of what it inherited from the supervisor (descriptors, secrets),
applies the worker's resource limits, names the process, builds the worker from its `WorkerSpec`, and runs it with
`WorkerLoop` (`supervisor.worker_loop`). The modules named `worker_*` run in the worker's process; the others in
the supervisor's.

Failure policy (written here and in `worker_loop`, because it is implemented there):
- an exception from `on_start` is a crash: it is reported over the channel (`StartFailed`), and the process exits
  with code 1 so the supervisor applies the worker's restart policy. The exit code is never read as a message: a
  worker's own `sys.exit(3)` is a crash with exit code 3;
- the end of the pipe means the supervisor is gone: the worker runs `on_stop` and exits;
- MemoryError anywhere (the worker's memory limit, see `_apply_limits`) ends the process with `LimitReached`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec

from contracts import Inbound, LimitReached, StartFailed, Worker
from supervisor import registry, secrets
from supervisor.channel import Channel
from supervisor.errors import ChannelClosed
from supervisor.logrelay import Relay
from supervisor.worker_loop import WorkerLoop, WorkerSpec

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


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
    relay = None
    if spec.mqtt_log_level != "OFF":
        relay = Relay(spec.mqtt_log_level)
        logging.getLogger().addHandler(relay)
    channel: Channel[Inbound] = Channel(sock, Inbound)
    try:
        worker = _build(spec)
    except Exception as exc:  # policy: a worker that cannot be built (its changed module broken) failed to start
        logging.getLogger(f"workers.{spec.name}").exception("cannot build the worker")
        logged = relay.take() if relay is not None else None
        with contextlib.suppress(Exception):
            channel.send([*([logged] if logged else []), StartFailed(error=f"{type(exc).__name__}: {exc}")])
        os._exit(1)
    try:
        code = WorkerLoop(spec, worker, channel, in_handler, relay).run()
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


def _build(spec: WorkerSpec) -> Worker:  # type: ignore[type-arg]
    """The worker `spec` describes, from its module as it is on disk now: a forked process holds the module the
    supervisor imported at its start, so when the file changed since, it is imported again (only then: a restart
    of unchanged code costs one stat)."""
    imported = spec.module in sys.modules
    module = importlib.import_module(spec.module)
    if imported and spec.module_mtime_ns is not None and registry.source_mtime(module) != spec.module_mtime_ns:
        logging.getLogger(f"workers.{spec.name}").info("its module %s changed on disk; loading it again", spec.module)
        registry.forget_bytecode(module)
        module = importlib.reload(module)
    worker_class = getattr(module, spec.qualname)
    worker = worker_class()
    worker.config = msgspec.msgpack.decode(spec.config, type=worker_class.Config)
    worker.site = spec.site
    return worker  # type: ignore[no-any-return]


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
    kills a worker whose resident memory passes the limit (see `supervisor.pool`).
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
