"""Broken start: a test worker whose `on_start` always raises. Consumes, produces and touches nothing."""

from __future__ import annotations

from contracts import Context, Worker


class BrokenStart(Worker):  # type: ignore[type-arg]
    """Raises in `on_start`, to exercise restart backoff and intensity."""

    name = "broken_start"

    def on_start(self, ctx: Context) -> None:
        raise RuntimeError("cannot start")
