"""Typed: a test worker whose messages reach typed handlers.

Consumes: `<prefix>/reading` (JSON `Reading`), `<prefix>/note` (UTF-8 text), `<prefix>/blob` (msgpack `Reading`),
`<prefix>/later` (JSON `Reading`, subscribed while running), and anything else under `<prefix>/#` through
`on_message`. Produces on `<out>/<handler>`: what each handler got, as JSON. Reports how many readings it saw as its
own status field `readings`. Touches nothing.
"""

from __future__ import annotations

from typing import Any

import msgspec

from contracts import Context, Message, Subscription, Worker


class Reading(msgspec.Struct, frozen=True):
    sensor: str
    value: float


class TypedConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    prefix: str
    out: str


class Typed(Worker[TypedConfig]):
    """Echoes what its typed handlers are given."""

    name = "typed"
    Config = TypedConfig

    def __init__(self) -> None:
        self.readings = 0

    def subscriptions(self) -> list[Subscription]:
        prefix = self.config.prefix
        return [
            Subscription(f"{prefix}/reading", qos=1, handler=self._reading, type=Reading),
            Subscription(f"{prefix}/note", handler=self._note, type=str),
            Subscription(f"{prefix}/blob", handler=self._reading, type=Reading, format="msgpack"),
            Subscription(f"{prefix}/#", qos=1),  # the rest: on_message (the first filter that matches wins)
        ]

    def on_start(self, ctx: Context) -> None:
        ctx.subscribe(Subscription(f"{self.config.prefix}/later", handler=self._reading, type=Reading))

    def _reading(self, ctx: Context, reading: Reading, message: Message) -> None:
        self.readings += 1
        self._say(ctx, "reading", {"sensor": reading.sensor, "value": reading.value, "topic": message.topic})
        ctx.report_status(readings=self.readings)

    def _note(self, ctx: Context, note: str, message: Message) -> None:
        self._say(ctx, "note", {"text": note})

    def on_message(self, ctx: Context, message: Message) -> None:
        self._say(ctx, "on_message", {"topic": message.topic, "payload": message.payload.decode(errors="replace")})

    def _say(self, ctx: Context, handler: str, what: dict[str, Any]) -> None:
        ctx.publish(f"{self.config.out}/{handler}", msgspec.json.encode(what), qos=1)
