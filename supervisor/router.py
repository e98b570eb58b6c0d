"""The router: which workers a topic goes to, by MQTT topic-filter matching.

Filters follow MQTT (`contracts.topics` holds the matching itself). Results are cached per topic; the cache is
bounded.

A broker sends one copy of a message for every subscription of ours it matches. Each filter therefore has a
subscription id (sent as the MQTT 5 Subscription Identifier), and each route names the one filter through which its
worker takes a topic: a copy goes to a worker only when it carries that filter's subscription id. Ids are only
needed (and only sent) when two filters overlap. Under MQTT 3.1.1 there are no ids, so `broker_filters` leaves out
filters that another filter covers.
"""

from __future__ import annotations

from collections.abc import Iterable

from contracts.topics import InvalidTopicFilter, check_filter, covers, matches, overlap
from contracts.topics import filter_levels as _levels
from contracts.topics import match_levels as _match

__all__ = ["InvalidTopicFilter", "Router", "check_filter", "covers", "matches", "overlap"]

_CACHE_LIMIT = 4096


class Router:
    """Maps topics to the workers subscribed to them, and gives each filter a subscription id for the broker."""

    def __init__(self) -> None:
        self._added: list[tuple[str, str, int, bool, bool]] = []  # (worker, filter, qos, commands, local), in order
        self._ids: dict[str, int] = {}  # filter -> its subscription id, kept while the router lives
        self._routes: list[tuple[list[str], str, int]] = []
        self._filters: dict[str, tuple[int, int]] = {}  # filter -> (sub_id, highest qos)
        self._cache: dict[str, tuple[tuple[str, int], ...]] = {}
        self._commands: set[tuple[str, int]] = set()  # (worker, filter's subscription id) whose messages are commands
        self._local: set[tuple[str, int]] = set()  # (worker, filter's subscription id) that takes local messages only
        self._broker: set[str] = set()  # the filters some worker takes from the broker
        self._shared: set[int] = set()  # the subscription ids of shared subscriptions ($share/<group>/<filter>)

    def add(
        self, worker: str, topic_filters: Iterable[str], qos: int = 0, commands: bool = False, local: bool = False
    ) -> None:
        for topic_filter in topic_filters:
            check_filter(topic_filter)
            self._added.append((worker, topic_filter, qos, commands, local))
            self._route(worker, topic_filter, qos, commands, local)
        self._cache.clear()

    def remove(self, worker: str) -> None:
        """Route nothing to `worker` any more. The other filters keep their subscription ids."""
        kept = [added for added in self._added if added[0] != worker]
        self._added, self._routes, self._filters = kept, [], {}
        self._commands, self._local, self._broker, self._shared = set(), set(), set(), set()
        for added in kept:
            self._route(*added)
        self._cache.clear()

    def _route(self, worker: str, topic_filter: str, qos: int, commands: bool, local: bool) -> None:
        sub_id = self._ids.setdefault(topic_filter, len(self._ids) + 1)
        known_qos = self._filters.get(topic_filter, (sub_id, 0))[1]
        self._filters[topic_filter] = (sub_id, max(qos, known_qos))
        self._routes.append((_levels(topic_filter), worker, sub_id))
        if topic_filter.startswith("$share/"):
            self._shared.add(sub_id)
        if commands:
            self._commands.add((worker, sub_id))
        if local:
            self._local.add((worker, sub_id))
        else:
            self._broker.add(topic_filter)

    def filters_of(self, worker: str) -> set[str]:
        """The filters added for `worker`."""
        return {topic_filter for w, topic_filter, *_ in self._added if w == worker}

    def routes_to(self, worker: str, topic_filter: str) -> bool:
        """True when `topic_filter` was added for `worker`."""
        sub_id = self.sub_id(topic_filter)
        return sub_id is not None and any(w == worker and n == sub_id for _, w, n in self._routes)

    def sub_id(self, topic_filter: str) -> int | None:
        """The subscription id of `topic_filter`, or None when no worker subscribed to it."""
        known = self._filters.get(topic_filter)
        return known[0] if known is not None else None

    def is_command(self, worker: str, sub_id: int) -> bool:
        """True when `worker` takes the topic through a filter it marked as carrying commands."""
        return (worker, sub_id) in self._commands

    def locally(self, topic: str) -> list[str]:
        """The workers a publication on `topic` made by a local worker goes to straight from the supervisor: all
        subscribed but those through a shared subscription (`$share/...`), whose copy the broker gives to one
        member of the group (maybe on another supervisor)."""
        return [worker for worker, sub_id in self.route(topic) if sub_id not in self._shared]

    def is_local(self, worker: str, sub_id: int) -> bool:
        """True when `worker` takes the topic through a filter for local messages only (never from the broker)."""
        return (worker, sub_id) in self._local

    def route(self, topic: str) -> tuple[tuple[str, int], ...]:
        """(worker, subscription id of its filter) for each worker subscribed to `topic`, each worker once, in the
        order added."""
        found = self._cache.get(topic)
        if found is None:
            parts = topic.split("/")
            first: dict[str, int] = {}
            for levels, worker, sub_id in self._routes:
                if worker not in first and _match(levels, parts):
                    first[worker] = sub_id
            found = tuple(first.items())
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[topic] = found
        return found

    def workers(self, topic: str) -> list[str]:
        """The workers subscribed to `topic`."""
        return [worker for worker, _ in self.route(topic)]

    def overlapping(self) -> bool:
        """True when two different filters can match one topic (so the broker may send one message twice)."""
        filters = list(self._filters)
        return any(overlap(f, g) for i, f in enumerate(filters) for g in filters[i + 1 :])

    def broker_filters(self, with_ids: bool) -> list[tuple[str, int, int]]:
        """(filter, qos, subscription id) to subscribe to: every filter some worker takes from the broker when
        `with_ids`, else only those no other covers."""
        filters = [(f, qos, sub_id) for f, (sub_id, qos) in self._filters.items() if f in self._broker]
        if with_ids:
            return filters
        kept = []
        for f, qos, sub_id in filters:
            wider = [(g, q) for g, q, _ in filters if g != f and covers(g, f)]
            if not wider:
                kept.append((f, max([qos, *(q for g, q, _ in filters if covers(f, g))]), sub_id))
        return kept
