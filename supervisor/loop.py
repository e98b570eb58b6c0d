"""The supervisor's one event loop: a selector over sockets and pipes, plus timers, on a single thread.

Each wake-up runs every ready callback, then every due timer, then the `after_wakeup` hooks (where the supervisor
writes what the callbacks queued, once per wake-up rather than once per message).

Failure policy: an exception from a callback is handed to the loop's `on_error`, which decides: the supervisor's
logs and counts it and the loop goes on with the next callback, unless the exception says its state is broken (see
`supervisor.core`); without an `on_error` it propagates.
"""

from __future__ import annotations

import heapq
import itertools
import math
import selectors
import time
from collections.abc import Callable
from typing import Protocol

Callback = Callable[[], None]


class FileLike(Protocol):
    def fileno(self) -> int: ...


class TimerHandle:
    """A scheduled call; `cancel` keeps it from running. It runs at `when`, or from `earliest` on in a wake-up that
    comes anyway."""

    __slots__ = ("callback", "cancelled", "earliest", "when")

    def __init__(self, when: float, callback: Callback, earliest: float | None = None) -> None:
        self.when = when
        self.earliest = when if earliest is None else earliest
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """Selector loop with timers. `clock` is monotonic seconds and may be replaced in tests. `phase`: aligned timers
    (`call_later(aligned=True)`) run this long after their multiple of the clock, or from the multiple on in a
    wake-up that comes anyway; the supervisor's periodic tasks so run in the wake-up that reads the heartbeats its
    idle workers send on the multiples, instead of in one of their own just before it."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[Exception], None] | None = None,
        phase: float = 0.0,
    ) -> None:
        self.clock = clock
        self.on_error = on_error
        self.phase = phase
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._sequence = itertools.count()
        self._after_wakeup: list[Callback] = []
        self._callbacks: dict[int, list[Callback | None]] = {}  # fd -> [on_readable, on_writable]
        self.io_wakeups = 0  # wake-ups that found a descriptor ready (not only a timer due)

    def add_reader(self, file: FileLike | int, callback: Callback) -> None:
        self._set(file, 0, callback)

    def remove_reader(self, file: FileLike | int) -> None:
        self._set(file, 0, None)

    def add_writer(self, file: FileLike | int, callback: Callback) -> None:
        self._set(file, 1, callback)

    def remove_writer(self, file: FileLike | int) -> None:
        self._set(file, 1, None)

    def call_later(self, delay: float, callback: Callback, aligned: bool = False) -> TimerHandle:
        """Call `callback` after `delay` seconds; `aligned` (a periodic task's next run): at the next multiple of
        `delay` on the clock instead (plus the loop's `phase`), so that periodic tasks whose periods divide each
        other's run in one wake-up (an idle process wakes less often)."""
        now = self.clock()
        if aligned and delay > 0:
            multiple = (math.floor(now / delay) + 1) * delay  # the next one strictly after now, even when run early
            return self.call_at(multiple + self.phase, callback, earliest=multiple)
        return self.call_at(now + max(delay, 0.0), callback)

    def call_at(self, when: float, callback: Callback, earliest: float | None = None) -> TimerHandle:
        """Call `callback` at `when`; given `earliest`, from then on in a wake-up that comes anyway."""
        handle = TimerHandle(when, callback, earliest)
        heapq.heappush(self._timers, (when, next(self._sequence), handle))
        return handle

    def next_due(self) -> float | None:
        """When the next timer that is not cancelled is due, on the loop's clock; None when there is none."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def after_wakeup(self, callback: Callback) -> None:
        """Run `callback` at the end of every wake-up."""
        self._after_wakeup.append(callback)

    def run_once(self, max_wait: float = 1.0) -> None:
        """Wait for I/O or the next timer (at most `max_wait` seconds), then run what is ready."""
        timeout = max_wait
        if self._timers:
            timeout = min(timeout, max(self._timers[0][0] - self.clock(), 0.0))
        ready = self._selector.select(timeout)
        if ready:
            self.io_wakeups += 1
        for key, events in ready:
            callbacks = self._callbacks.get(key.fd)
            if callbacks is None:
                continue  # unregistered by an earlier callback of this wake-up
            on_readable, on_writable = callbacks
            try:
                if events & selectors.EVENT_READ and on_readable is not None:
                    on_readable()
                if events & selectors.EVENT_WRITE and on_writable is not None and key.fd in self._callbacks:
                    on_writable()
            except Exception as exc:  # policy: see the module docstring
                self._failed(exc)
        self._run_due_timers()
        for callback in self._after_wakeup:
            try:
                callback()
            except Exception as exc:  # policy: see the module docstring
                self._failed(exc)

    def _run_due_timers(self) -> None:
        now = self.clock()
        set_before = next(self._sequence)  # a timer set by one of these callbacks runs early from the next wake-up on
        while self._timers:
            when, sequence, handle = self._timers[0]
            if when > now and (handle.earliest > now or sequence > set_before):
                break
            heapq.heappop(self._timers)
            if not handle.cancelled:
                try:
                    handle.callback()
                except Exception as exc:  # policy: see the module docstring
                    self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        if self.on_error is None:
            raise exc
        self.on_error(exc)

    def _set(self, file: FileLike | int, slot: int, callback: Callback | None) -> None:
        fd = file if isinstance(file, int) else file.fileno()
        callbacks = self._callbacks.get(fd, [None, None])
        if callbacks[slot] == callback:
            return  # unchanged: no system call
        callbacks[slot] = callback
        events = (selectors.EVENT_READ if callbacks[0] else 0) | (selectors.EVENT_WRITE if callbacks[1] else 0)
        registered = fd in self._callbacks
        if not events:
            if registered:
                self._selector.unregister(fd)
                del self._callbacks[fd]
        elif registered:
            self._selector.modify(fd, events)
        else:
            self._selector.register(fd, events)
            self._callbacks[fd] = callbacks

    def fds(self) -> list[int]:
        """Every descriptor the loop watches, and the selector's own."""
        return [*self._callbacks, self._selector.fileno()]

    def close(self) -> None:
        self._selector.close()
