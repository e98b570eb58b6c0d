"""Log lines over MQTT: each worker's log records at or above `[supervisor] mqtt_log_level` (WARNING by default) on
`<base>/log/<worker>`, which `ctl tail` and Home Assistant follow, next to the journal that has them all.

In the worker process, `Relay` (a logging handler) keeps the records for the worker loop, which sends them with
its other envelopes (`Logged`); at most `MAX_PENDING` wait between two sends, the oldest dropped and counted. In the
supervisor, `LogPublisher` publishes each line as JSON (QoS 0, not retained), with the supervisor's own lines about
that worker (it crashed, was killed, cannot start: log calls with `extra=about(name)`), at most `RATE` lines a
second per worker after a burst of `BURST`; what it leaves out is counted in the next line that goes (`dropped`).
Each line's message is cut at `MAX_CHARS`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from contracts import Logged, LogLine, Publish, Site

MAX_PENDING = 200
MAX_CHARS = 4000
RATE = 10.0
BURST = 50.0


def about(worker: str) -> dict[str, str]:
    """The `extra` of a supervisor log call about `worker`: the line goes to that worker's log topic too."""
    return {"worker": worker}


def line_of(record: logging.LogRecord) -> LogLine:
    try:
        text = record.getMessage()
    except Exception:  # a bad format string in a log call: the template itself says enough
        text = str(record.msg)
    if record.exc_info:
        text += "\n" + logging.Formatter().formatException(record.exc_info)
    return LogLine(time=record.created, level=record.levelno, logger=record.name, message=text[:MAX_CHARS])


class Relay(logging.Handler):
    """In a worker process: its records at or above `level`, kept until the worker loop `take`s them (records
    come from the worker's threads too)."""

    def __init__(self, level: str) -> None:
        super().__init__(level)
        self._lines: deque[LogLine] = deque(maxlen=MAX_PENDING)
        self._dropped = 0
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        line = line_of(record)
        with self._guard:
            if len(self._lines) == MAX_PENDING:
                self._dropped += 1
            self._lines.append(line)

    def take(self) -> Logged | None:
        """What was logged since the last call, as one envelope; None when nothing was."""
        with self._guard:
            if not self._lines:
                return None
            logged = Logged(lines=list(self._lines), dropped=self._dropped)
            self._lines.clear()
            self._dropped = 0
        return logged


class LogPublisher(logging.Handler):
    """In the supervisor: publishes the workers' lines, and (as a handler on the "supervisor" logger) its own
    lines about a worker, rate-limited per worker."""

    def __init__(
        self,
        site: Site,
        level: str,
        publish: Callable[[Publish], object],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.set_level(level)
        self.site = site
        self.publish_ = publish
        self.clock = clock
        self._tokens: dict[str, tuple[float, float]] = {}  # worker -> (tokens, when counted)
        self._dropped: dict[str, int] = {}
        self._encoder = msgspec.json.Encoder()

    def set_level(self, level: str) -> None:
        """Publish from `level` on ("OFF": nothing)."""
        self.setLevel(level if level != "OFF" else logging.CRITICAL + 1)

    def lines(self, worker: str, logged: Logged) -> None:
        """Lines a worker's process sent."""
        self._dropped[worker] = self._dropped.get(worker, 0) + max(logged.dropped, 0)
        for line in logged.lines:
            if line.level >= self.level:
                self._publish(worker, line)

    def forget(self, worker: str) -> None:
        self._tokens.pop(worker, None)
        self._dropped.pop(worker, None)

    def emit(self, record: logging.LogRecord) -> None:
        worker = getattr(record, "worker", None)
        if isinstance(worker, str):
            try:
                self._publish(worker, line_of(record))
            except Exception:  # logging must never break the code that logs
                self.handleError(record)

    def _publish(self, worker: str, line: LogLine) -> None:
        now = self.clock()
        tokens, when = self._tokens.get(worker, (BURST, now))
        tokens = min(BURST, tokens + (now - when) * RATE)
        if tokens < 1.0:
            self._tokens[worker] = (tokens, now)
            self._dropped[worker] = self._dropped.get(worker, 0) + 1
            return
        self._tokens[worker] = (tokens - 1.0, now)
        level = logging.getLevelName(line.level)  # "Level 45" for a number logging has no name for
        document: dict[str, Any] = {
            "worker": worker,
            "time": _iso(line.time),
            "level": level,
            "event_type": level.lower().replace(" ", "_"),
            "logger": line.logger[:200],
            "message": line.message[:MAX_CHARS],
        }
        dropped = self._dropped.pop(worker, 0)
        if dropped:
            document["dropped"] = dropped
        self.publish_(Publish(topic=self.site.log_topic(worker), payload=self._encoder.encode(document), qos=0))


def _iso(seconds: float) -> str:
    """The time of a line as ISO 8601; now, for a time a worker got wrong (NaN, out of range)."""
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    except (ValueError, OverflowError, OSError):
        return datetime.now(UTC).isoformat(timespec="milliseconds")
