"""Relay: consumes every topic in `topics` and republishes each payload unchanged on `<out>/<worker name>` at `qos`.
Touches nothing outside. The benchmark's echo worker: the least work a worker can do per message."""

from __future__ import annotations

import time

import msgspec

from contracts import Context, Message, Subscription, Worker


class RelayConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    topics: list[str]
    out: str
    qos: int = 0
    delay_seconds: float = 0.0  # time taken by every message, to make a slow consumer


class Relay(Worker[RelayConfig]):
    """Republishes every message it receives, unchanged."""

    name = "relay"
    Config = RelayConfig

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(t, qos=self.config.qos) for t in self.config.topics]

    def on_start(self, ctx: Context) -> None:
        self.topic = f"{self.config.out}/{ctx.name}"

    def on_message(self, ctx: Context, message: Message) -> None:
        if self.config.delay_seconds:
            time.sleep(self.config.delay_seconds)
        ctx.publish(self.topic, message.payload, qos=self.config.qos)
