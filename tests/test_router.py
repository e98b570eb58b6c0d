"""Topic-filter matching and routing, as MQTT defines it."""

from __future__ import annotations

import re

import pytest

from supervisor.router import InvalidTopicFilter, Router, check_filter, matches


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+/c", "a/b/c", True),
        ("+/+", "a/b", True),
        ("a/#", "a", True),  # '#' also matches the parent level
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+", "", True),
        ("a/+", "a/", True),  # an empty level is a level
        ("#", "$SYS/broker", False),  # wildcards do not match $-topics at the first level
        ("+/broker", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("$share/group/a/+", "a/b", True),
        ("$share/group/a/+", "b/b", False),
        ("a/b", "a/b/", False),
    ],
)
def test_matches_follows_mqtt(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("topic_filter", "reason"),
    [("a/#/b", "'#' must be the last level"), ("a/b#", "a wildcard must fill its whole level, not 'b#'"),
     ("a+/b", "a wildcard must fill its whole level, not 'a+'"), ("", "it is empty")],
)
def test_invalid_filters_are_rejected(topic_filter: str, reason: str) -> None:
    expected = re.escape(f"invalid topic filter '{topic_filter}': {reason}")
    with pytest.raises(InvalidTopicFilter, match=rf"^{expected}$"):
        check_filter(topic_filter)


def test_route_returns_each_subscribed_worker_once_in_order() -> None:
    router = Router()
    router.add("lights", ["home/+/light", "home/#"])
    router.add("logger", ["#"])
    router.add("doors", ["home/door/+"])
    assert router.route("home/kitchen/light") == ("lights", "logger")
    assert router.route("home/door/front") == ("lights", "logger", "doors")
    assert router.route("garden/sensor") == ("logger",)
    assert router.route("$SYS/x") == ()


def test_route_cache_sees_workers_added_later() -> None:
    router = Router()
    router.add("one", ["x/#"])
    assert router.route("x/y") == ("one",)
    router.add("two", ["x/y"])
    assert router.route("x/y") == ("one", "two")
