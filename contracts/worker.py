"""The worker contract: the `Worker` base class, the `Context` it is given, and `Subscription`.

A worker is a module in `workers/` with one subclass of `Worker`. The supervisor sets `self.config` (an instance of
the class's `Config` Struct, decoded from the worker's `[workers.<name>]` section) before `on_start`, then calls
`on_message` once per message, one at a time, and `on_stop` on shutdown. Everything a worker does outside its own
process goes through its `Context`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import msgspec

from contracts.envelopes import Message


class Subscription(msgspec.Struct, frozen=True):
    """An MQTT topic filter (wildcards `+` and `#` allowed) a worker wants messages from, with the QoS to ask for.

    `commands=True` marks a filter whose messages are commands: a retained message there is a stale command (the
    broker replays it to every new subscriber), so the supervisor drops and counts it instead of delivering it.
    """

    topic_filter: str
    qos: int = 0
    commands: bool = False


class NoConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `Config` of a worker that takes no options."""


class Timer(Protocol):
    """A scheduled callback; `cancel` stops it from running again."""

    def cancel(self) -> None: ...


class Context(Protocol):
    """What a running worker may use: publishing, error reporting, logging, its state directory, time, timers."""

    name: str
    log: logging.Logger
    state_dir: Path
    config: Any

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
        """Send `payload` to `topic`: to local subscribers, and to the broker unless `local_only`."""
        ...

    def report_error(self, kind: str, detail: str) -> None:
        """Count one error of `kind` for this worker (shown in metrics and status) and log `detail`."""
        ...

    def now(self) -> float:
        """Seconds since the epoch, from a clock that tests can replace."""
        ...

    def every(self, seconds: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` every `seconds`, between messages, starting `seconds` from now."""
        ...

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` once, `seconds` from now, between messages."""
        ...


ConfigT = TypeVar("ConfigT", bound=msgspec.Struct)


class Worker(Generic[ConfigT]):
    """Base class of every worker. Subclasses set `name` and `Config` and override the hooks they need.

    Failure policy: an exception from `on_message` or a timer callback is counted as an error of kind `handler` and
    the worker goes on with the next message; an exception from `on_start` crashes the worker, and the supervisor
    restarts it according to its restart policy.
    """

    name: ClassVar[str]
    Config: ClassVar[type[msgspec.Struct]] = NoConfig
    config: ConfigT

    def subscriptions(self) -> list[Subscription]:
        """The topic filters this worker receives; called after `config` is set, in the supervisor process."""
        return []

    def on_start(self, ctx: Context) -> None:
        """Called once in the worker process before the first message."""

    def on_message(self, ctx: Context, message: Message) -> None:
        """Called for each message, one at a time."""

    def on_stop(self, ctx: Context) -> None:
        """Called once when the worker is asked to stop."""
