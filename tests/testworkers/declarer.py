"""Declarer: a test worker that declares Home Assistant entities from its config and reports button presses.

Consumes: its buttons' presses (commands). Produces: one retained state per sensor on `<out>/<sensor>`, and
`<name>: <payload>` for every command it gets on `<out>/command`. Touches nothing outside.
"""

from __future__ import annotations

import msgspec

from contracts import Command, Context, Worker
from contracts.homeassistant import Button, Sensor


class DeclarerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    out: str
    sensors: list[str] = msgspec.field(default_factory=list)
    buttons: list[str] = msgspec.field(default_factory=list)


class Declarer(Worker[DeclarerConfig]):
    """Declares `sensors` and `buttons`; publishes each command it receives on `<out>/command`."""

    name = "declarer"
    Config = DeclarerConfig

    def on_start(self, ctx: Context) -> None:
        config = self.config
        ctx.declare(
            [Sensor(object_id=s, name=s, state_topic=f"{config.out}/{s}") for s in config.sensors]
            + [Button(object_id=b, name=b, command_topic=ctx.command_topic(b)) for b in config.buttons]
        )
        for sensor in config.sensors:
            ctx.publish(f"{config.out}/{sensor}", "42", qos=1, retain=True)

    def on_command(self, ctx: Context, command: Command) -> None:
        ctx.publish(f"{self.config.out}/command", f"{command.name}: {command.payload.decode()}", qos=1)
