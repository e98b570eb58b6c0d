"""MQTT topic filters: whether a topic matches a filter, by MQTT's rules.

`+` matches one level, `#` (last) matches any number of levels including none, and topics starting with `$` are not
matched by a filter that starts with a wildcard. A shared subscription `$share/<group>/<filter>` matches as
`<filter>`. Used by the supervisor's router and by workers that take several filters and dispatch on them.
`check_filter` says whether a filter is valid, `covers` and `overlap` how two filters relate.
`publish_topic_problem` says whether a topic can be published to at all (the broker drops the connection of a
client that publishes to an invalid one).
"""

from __future__ import annotations


def matches(topic_filter: str, topic: str) -> bool:
    """True when `topic` matches `topic_filter`."""
    return match_levels(filter_levels(topic_filter), topic.split("/"))


def filter_levels(topic_filter: str) -> list[str]:
    """The levels of `topic_filter`, without a `$share/<group>/` prefix."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    return topic_filter.split("/")


def match_levels(levels: list[str], topic: list[str]) -> bool:
    """`matches` over a filter and a topic already split into levels (for callers that match many)."""
    if topic[0].startswith("$") and levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(levels):
        if level == "#":
            return True
        if index >= len(topic) or (level != "+" and level != topic[index]):
            return False
    return len(levels) == len(topic)


class InvalidTopicFilter(ValueError):
    """Raised when a topic filter breaks MQTT's rules (wildcards not alone in their level, `#` not last)."""

    def __init__(self, topic_filter: str, reason: str) -> None:
        self.topic_filter = topic_filter
        super().__init__(f"invalid topic filter {topic_filter!r}: {reason}")


def check_filter(topic_filter: str) -> None:
    """Raise InvalidTopicFilter unless `topic_filter` is a valid MQTT topic filter."""
    levels = filter_levels(topic_filter)
    if not topic_filter:
        raise InvalidTopicFilter(topic_filter, "it is empty")
    for index, level in enumerate(levels):
        if ("+" in level or "#" in level) and len(level) > 1:
            raise InvalidTopicFilter(topic_filter, f"a wildcard must fill its whole level, not {level!r}")
        if level == "#" and index != len(levels) - 1:
            raise InvalidTopicFilter(topic_filter, "'#' must be the last level")


def covers(wide: str, narrow: str) -> bool:
    """True when every topic that matches filter `narrow` also matches filter `wide`."""
    a, b = filter_levels(wide), filter_levels(narrow)
    if b[0].startswith("$") and a[0] in ("+", "#"):
        return False
    for index, level in enumerate(a):
        if level == "#":
            return True
        if index >= len(b) or b[index] == "#" or (level != "+" and (level != b[index] or b[index] == "+")):
            return False
    return len(a) == len(b)


def overlap(first: str, second: str) -> bool:
    """True when some topic matches both filters."""
    a, b = filter_levels(first), filter_levels(second)
    if a[0].startswith("$") != b[0].startswith("$"):
        wild = a[0] if b[0].startswith("$") else b[0]
        if wild in ("+", "#"):
            return False
    for index in range(max(len(a), len(b))):
        if index >= len(a) or index >= len(b):
            longer = a if len(a) > len(b) else b
            return longer[index] == "#"  # 'x/#' also matches 'x'
        p, q = a[index], b[index]
        if "#" in (p, q):
            return True
        if "+" not in (p, q) and p != q:
            return False
    return True


MAX_TOPIC_BYTES = 65535  # MQTT: a two-byte length


def publish_topic_problem(topic: str) -> str | None:
    """Why `topic` cannot be published to (empty, a wildcard, a NUL character, too long), or None when it can."""
    if not topic:
        return "the topic is empty"
    if "+" in topic or "#" in topic:
        return f"the topic {topic[:200]!r} contains a wildcard (+ or #)"
    if "\0" in topic:
        return f"the topic {topic[:200]!r} contains a NUL character"
    if len(topic.encode(errors="surrogatepass")) > MAX_TOPIC_BYTES:
        return f"the topic is longer than {MAX_TOPIC_BYTES} bytes"
    return None
