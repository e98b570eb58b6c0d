"""Secrets: read once, kept out of every process's environment, and given to each worker only if its section names
them.

The secret variables are the one holding the MQTT password (`[mqtt] password_env`, and `MQTT_PASSWORD`) and every
variable a worker section names in a key ending in `_env` (the ai_analyzer's `api_key_env`). Removing them from
`os.environ` is not enough: `/proc/<pid>/environ` shows the environment a process was started with, and a forked
worker starts with the supervisor's. So when the supervisor finds a secret in its environment, it re-executes
itself once, same pid, without them, handing their values to the new image through a pipe (`reexec_without`).
Then:
- the supervisor holds the MQTT password in memory (paho needs it to reconnect);
- each worker process gets, in its `os.environ` only, the variables its own section names;
- a forked worker drops the copies it inherited before any worker code runs (`forget_inherited`): every `Secret`
  and what the MQTT link registered with `on_fork_child`. What stays is freed memory no Python object reaches.
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from collections.abc import Callable, Iterable, MutableMapping
from typing import ClassVar

_HANDOVER = "MQTT_HOME_SUPERVISOR_SECRETS_FD"  # the descriptor the previous image wrote the secrets to


class Secret:
    """A value that never shows in logs or reprs, and that a forked worker forgets."""

    __slots__ = ("__weakref__", "_value")
    _all: ClassVar[weakref.WeakSet[Secret]] = weakref.WeakSet()

    def __init__(self, value: str) -> None:
        self._value = value
        Secret._all.add(self)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"


_child_scrubbers: list[Callable[[], None]] = []


def on_fork_child(scrub: Callable[[], None]) -> None:
    """Have a forked worker run `scrub` first, to drop a copy of a secret held outside a `Secret` (paho's)."""
    _child_scrubbers.append(scrub)


def forget_inherited() -> None:
    """In a forked worker, before any worker code: forget every secret the supervisor held."""
    for secret in list(Secret._all):
        secret._value = ""
    for scrub in _child_scrubbers:
        scrub()
    _child_scrubbers.clear()


def take_handover(environ: MutableMapping[str, str]) -> dict[str, str]:
    """The secrets the previous image of this process handed over (none if it did not), removing the handover
    variable from `environ`."""
    fd = environ.pop(_HANDOVER, None)
    if fd is None:
        return {}
    with os.fdopen(int(fd), "rb") as pipe:
        values: dict[str, str] = json.loads(pipe.read())
    return values


def reexec_without(names: Iterable[str], environ: dict[str, str]) -> None:
    """If any of `names` is in this process's environment, execute this program again (same pid, same arguments)
    without them, their values passed on through a pipe; returns only when there is nothing to remove."""
    found = {name: environ[name] for name in names if name in environ}
    if not found:
        return
    read, write = os.pipe()
    data = json.dumps(found).encode()
    if len(data) > 60_000:  # a pipe holds 64 KiB: more would block this write before the exec
        raise ValueError("the secret variables hold more than 60 kB")
    os.write(write, data)
    os.close(write)
    os.set_inheritable(read, True)
    clean = {k: v for k, v in environ.items() if k not in found} | {_HANDOVER: str(read)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, clean)
