"""Tally: a test worker that writes down every message it handles.

Consumes: every topic in `topics`. Produces nothing. Touches its state directory: one line per handled message,
`<publication id> <topic> <payload>`, appended to `handled.txt` before the handler returns.
"""

from __future__ import annotations

import msgspec

from contracts import Context, Message, Subscription, Worker


class TallyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    topics: list[str]
    qos: int = 1


class Tally(Worker[TallyConfig]):
    """Appends each message it handles to `handled.txt` in its state directory."""

    name = "tally"
    Config = TallyConfig

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(t, qos=self.config.qos) for t in self.config.topics]

    def on_message(self, ctx: Context, message: Message) -> None:
        with (ctx.state_dir / "handled.txt").open("a") as f:
            f.write(f"{message.publication_id} {message.topic} {message.payload.decode()}\n")
