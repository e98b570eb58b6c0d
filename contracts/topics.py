"""MQTT topic filters: whether a topic matches a filter, by MQTT's rules.

`+` matches one level, `#` (last) matches any number of levels including none, and topics starting with `$` are not
matched by a filter that starts with a wildcard. A shared subscription `$share/<group>/<filter>` matches as
`<filter>`. Used by the supervisor's router and by workers that take several filters and dispatch on them.
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
