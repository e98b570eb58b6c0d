"""Envelopes: the Structs that cross the pipe between the supervisor and one worker process.

There are two channels, each a tagged union with one decoder: `Inbound` (supervisor to worker) and `Outbound`
(worker to supervisor). One frame on the pipe is a msgpack array of envelopes of its channel, so a busy loop writes
many envelopes with one system call. Structs are `array_like` to keep frames small and encoding fast.
"""

from __future__ import annotations

import msgspec

from contracts.homeassistant import DeclaredEntity
from contracts.status import WorkerFacts


class LogLine(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One log record, as published on `<base>/log/<worker>` (JSON, with `worker` and `event_type` added)."""

    time: float  # seconds since the epoch
    level: int  # logging's number: 30 WARNING, 40 ERROR, ...
    logger: str
    message: str  # with its traceback, if any; bounded


class Envelope(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", array_like=True):
    """Base of every envelope; the tag names the concrete type on the wire."""


# Supervisor to worker ---------------------------------------------------------------------------------------------


class Message(Envelope, tag="message", frozen=True, kw_only=True):
    """One MQTT message (from the broker or from another worker) handed to a worker.

    `id` is unique within one supervisor run. `attempt` is 1 on first delivery and grows each time the message is
    delivered again after the worker process that had it died; `crashes` counts only the deaths that happened while
    this message was in the worker's handler (the ones it may have caused). `publication_id` is the stable id of the
    publication this message is a copy of (the same on every delivery of it, across restarts of either side), or
    None when its publisher gave none.
    """

    id: int
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    attempt: int = 1
    response_topic: str | None = None
    correlation_data: bytes | None = None
    crashes: int = 0
    publication_id: str | None = None

    @property
    def redelivered(self) -> bool:
        return self.attempt > 1

    def text(self) -> str:
        """The payload as UTF-8 text; raises UnicodeDecodeError for other bytes."""
        return self.payload.decode()


class Stop(Envelope, tag="stop", frozen=True, kw_only=True):
    """Finish the message in hand, run `on_stop` and exit."""


Inbound = Message | Stop


# Worker to supervisor ---------------------------------------------------------------------------------------------


class Started(Envelope, tag="started", frozen=True, kw_only=True):
    """The worker's `on_start` returned; it now takes messages."""

    pid: int


class StartFailed(Envelope, tag="start_failed", frozen=True, kw_only=True):
    """The worker's `on_start` raised `error`; the process exits next (a crash, restarted by its policy)."""

    error: str


class LimitReached(Envelope, tag="limit", frozen=True, kw_only=True):
    """The worker ran out of what its limit allows (`limit` names the key, e.g. `memory_limit_mb = 128`); the
    process exits next."""

    limit: str


class Publish(Envelope, tag="publish", frozen=True, kw_only=True):
    """Publish `payload` on `topic`: to local subscribers, and to the broker unless `local_only`.

    `expiry` is the MQTT 5 message expiry in seconds: None takes the configured default for events (non-retained
    publications) and no expiry for retained ones; 0 means never expire.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    expiry: int | None = None
    local_only: bool = False


class Handled(Envelope, tag="handled", frozen=True, kw_only=True):
    """The worker finished message `id` (successfully or not) after `seconds` of handling."""

    id: int
    seconds: float
    failed: bool = False


class ErrorReported(Envelope, tag="error", frozen=True, kw_only=True):
    """The worker counts one error of `kind` (a short fixed word such as `scrape` or `ai`)."""

    kind: str
    detail: str


class Heartbeat(Envelope, tag="heartbeat", frozen=True, kw_only=True):
    """The worker's loop is alive and idle."""


class EntitiesDeclared(Envelope, tag="entities", frozen=True, kw_only=True):
    """The worker's Home Assistant entities (all of them: they replace what it declared before)."""

    entities: list[DeclaredEntity]


class StatusReported(Envelope, tag="status", frozen=True, kw_only=True):
    """Fields for the worker's entry in the status document; unset (None) fields keep their last value."""

    facts: WorkerFacts


class Subscribe(Envelope, tag="subscribe", frozen=True, kw_only=True):
    """From now on, also route messages on `topic_filter` to this worker."""

    topic_filter: str
    qos: int = 0


class Logged(Envelope, tag="log", frozen=True, kw_only=True):
    """Log lines of the worker at or above `[supervisor] mqtt_log_level`, for `<base>/log/<worker>`; `dropped`:
    lines left out before these because the worker logged faster than they could go."""

    lines: list[LogLine]
    dropped: int = 0


Outbound = (
    Started
    | StartFailed
    | LimitReached
    | Publish
    | Handled
    | ErrorReported
    | Heartbeat
    | EntitiesDeclared
    | StatusReported
    | Subscribe
    | Logged
)
