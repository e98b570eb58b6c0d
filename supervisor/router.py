"""The router: which workers a topic goes to, by MQTT topic-filter matching.

Filters follow MQTT: `+` matches one level, `#` (last) matches any number of levels including none, and topics
starting with `$` are not matched by a filter that starts with a wildcard. A shared subscription
`$share/<group>/<filter>` matches as `<filter>`. Results are cached per topic; the cache is bounded.
"""

from __future__ import annotations

from collections.abc import Iterable

_CACHE_LIMIT = 4096


class InvalidTopicFilter(ValueError):
    """Raised when a topic filter breaks MQTT's rules (wildcards not alone in their level, `#` not last)."""

    def __init__(self, topic_filter: str, reason: str) -> None:
        self.topic_filter = topic_filter
        super().__init__(f"invalid topic filter {topic_filter!r}: {reason}")


def check_filter(topic_filter: str) -> None:
    """Raise InvalidTopicFilter unless `topic_filter` is a valid MQTT topic filter."""
    levels = _levels(topic_filter)
    if not topic_filter:
        raise InvalidTopicFilter(topic_filter, "it is empty")
    for index, level in enumerate(levels):
        if ("+" in level or "#" in level) and len(level) > 1:
            raise InvalidTopicFilter(topic_filter, f"a wildcard must fill its whole level, not {level!r}")
        if level == "#" and index != len(levels) - 1:
            raise InvalidTopicFilter(topic_filter, "'#' must be the last level")


def matches(topic_filter: str, topic: str) -> bool:
    """True when `topic` matches `topic_filter`."""
    return _match(_levels(topic_filter), topic.split("/"))


def _levels(topic_filter: str) -> list[str]:
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    return topic_filter.split("/")


def _match(levels: list[str], topic: list[str]) -> bool:
    if topic[0].startswith("$") and levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(levels):
        if level == "#":
            return True
        if index >= len(topic) or (level != "+" and level != topic[index]):
            return False
    return len(levels) == len(topic)


class Router:
    """Maps topics to the names of the workers subscribed to them."""

    def __init__(self) -> None:
        self._routes: list[tuple[list[str], str]] = []
        self._cache: dict[str, tuple[str, ...]] = {}

    def add(self, worker: str, topic_filters: Iterable[str]) -> None:
        for topic_filter in topic_filters:
            check_filter(topic_filter)
            self._routes.append((_levels(topic_filter), worker))
        self._cache.clear()

    def route(self, topic: str) -> tuple[str, ...]:
        """The workers subscribed to `topic`, each once, in the order they were added."""
        found = self._cache.get(topic)
        if found is None:
            parts = topic.split("/")
            found = tuple(dict.fromkeys(w for levels, w in self._routes if _match(levels, parts)))
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[topic] = found
        return found
