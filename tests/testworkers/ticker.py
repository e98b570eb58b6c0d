"""Ticker: consumes nothing; publishes a counter (0, 1, 2, ...) on `<out>/tick` every `interval_seconds` at QoS 1,
`count` times (forever when unset). Touches nothing outside. Shows what happens to a worker's publications while
the broker is away."""

from __future__ import annotations

import msgspec

from contracts import Context, Worker


class TickerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    out: str
    interval_seconds: float = 0.01
    count: int | None = None


class Ticker(Worker[TickerConfig]):
    """Publishes a counter on a timer."""

    name = "ticker"
    Config = TickerConfig

    def on_start(self, ctx: Context) -> None:
        self.count = 0
        self.timer = ctx.every(self.config.interval_seconds, lambda: self.tick(ctx))

    def tick(self, ctx: Context) -> None:
        ctx.publish(f"{self.config.out}/tick", str(self.count), qos=1)
        self.count += 1
        if self.count == self.config.count:
            self.timer.cancel()
