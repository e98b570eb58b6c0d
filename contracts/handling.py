"""Typed handlers: which of a worker's handlers a message goes to, and the payload decoded for it.

A `Subscription` with a `handler` gets each message on its filter decoded as its `type` (a msgspec Struct or any
type msgspec decodes: JSON, or msgpack with `format="msgpack"`; `bytes` for the raw payload, `str` for UTF-8 text)
and passed as `handler(ctx, value, message)`. A subscription whose filter is the topic itself takes the message;
else the first (in the order declared, those made while running last) whose filter matches; a message that none
with a handler matches goes to `Worker.on_message`. A payload that does not decode as the type is counted as a
`decode` error and dropped, as when `on_message` raises a decode error. Used by the worker loop
(`supervisor.worker_loop.Handling`) and so by `supervisor.testing`, so that a test sees what a running worker does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from contracts.decoding import BoundedJson
from contracts.envelopes import Message
from contracts.topics import filter_levels, match_levels

if TYPE_CHECKING:
    from contracts.worker import Context, Subscription

_CACHED_TOPICS = 1024  # topics whose handler is remembered (cleared when full: topics may come from outside)


def decoder(subscription: Subscription) -> Callable[[bytes], Any]:
    """How the payloads of `subscription` are decoded for its handler."""
    kind, max_bytes = subscription.type, subscription.max_bytes
    if kind is bytes:
        return bytes
    if kind is str:
        return lambda payload: payload.decode("utf-8")
    if subscription.format == "msgpack":
        msgpack: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(kind)
        return msgpack.decode
    return BoundedJson(kind, max_bytes=max_bytes).decode


class _Route:
    def __init__(self, subscription: Subscription) -> None:
        self.levels = filter_levels(subscription.topic_filter)
        assert subscription.handler is not None
        self.handler = subscription.handler
        self.decode = decoder(subscription)


class Handlers:
    """A worker's typed handlers, by topic filter, in the order they were declared."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []
        self._by_topic: dict[str, _Route | None] = {}

    def add(self, subscription: Subscription) -> None:
        """Take `subscription`'s handler, if it has one (its filter was checked when it was made)."""
        if subscription.handler is not None:
            self._routes.append(_Route(subscription))
            self._by_topic.clear()

    def dispatch(self, ctx: Context, message: Message) -> bool:
        """Give `message` to the first handler whose filter matches its topic; False when none does. Raises what
        the decoder or the handler raises."""
        route = self._route(message.topic)
        if route is None:
            return False
        route.handler(ctx, route.decode(message.payload), message)
        return True

    def _route(self, topic: str) -> _Route | None:
        try:
            return self._by_topic[topic]
        except KeyError:
            pass
        levels = topic.split("/")
        route = next((r for r in self._routes if r.levels == levels), None)  # an exact filter wins
        if route is None:
            route = next((r for r in self._routes if match_levels(r.levels, levels)), None)
        if len(self._by_topic) >= _CACHED_TOPICS:
            self._by_topic.clear()
        self._by_topic[topic] = route
        return route
