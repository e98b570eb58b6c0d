"""The ai_analyzer's bus protocol: a worker asks for short human text and gets a correlated reply.

A requester publishes an `AiRequest` (JSON, QoS 1; local-only from a worker) on `request_topic(site.base_topic)`; the
ai_analyzer answers with an `AiReply` carrying the same `id` on the request's `reply_to` topic (QoS 1), within its
configured deadline, whether or not the model answered: `fallback` marks a rule-based result. A reply to a topic
under the base topic stays local (worker to worker); a reply to any other topic also goes to the broker, so that
scripts and Node-RED can ask too.
"""

from __future__ import annotations

import msgspec


class AiRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Ask for one short text per item. `task` names a prompt template in the ai_analyzer's config (`shorten` for
    event titles, `phrase` for automation suggestions are built in)."""

    id: str  # correlation id, echoed in the reply
    task: str
    items: list[str]
    reply_to: str


class AiReply(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to the `AiRequest` with the same `id`: `results[i]` belongs to `items[i]`."""

    id: str
    task: str
    results: list[str]
    fallback: bool = False  # True when the model failed and rules produced the results
    cached: bool = False  # True when every result came from the cache
    model: str | None = None
    error: str | None = None  # why the model was not used, when `fallback`


def request_topic(base_topic: str) -> str:
    return f"{base_topic}/ai/request"
