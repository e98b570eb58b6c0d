"""Topic-filter matching and routing, as MQTT defines it."""

from __future__ import annotations

import re

import pytest

from supervisor.router import InvalidTopicFilter, Router, check_filter, covers, matches, overlap


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
    [
        ("a/#/b", "'#' must be the last level"),
        ("a/b#", "a wildcard must fill its whole level, not 'b#'"),
        ("a+/b", "a wildcard must fill its whole level, not 'a+'"),
        ("", "it is empty"),
    ],
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
    assert router.workers("home/kitchen/light") == ["lights", "logger"]
    assert router.workers("home/door/front") == ["lights", "logger", "doors"]
    assert router.workers("garden/sensor") == ["logger"]
    assert router.workers("$SYS/x") == []


def test_each_route_names_the_first_filter_its_worker_matched() -> None:
    router = Router()
    router.add("lights", ["home/+/light", "home/#"])  # filters 1 and 2
    router.add("logger", ["#"])  # filter 3
    router.add("also", ["home/#"])  # filter 2 again
    assert router.route("home/hall/light") == (("lights", 1), ("logger", 3), ("also", 2))
    assert router.route("home/hall/door") == (("lights", 2), ("logger", 3), ("also", 2))


@pytest.mark.parametrize(
    ("wide", "narrow", "expected"),
    [
        ("a/#", "a/+/c", True),
        ("#", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/+", True),
        ("a/b", "a/+", False),
        ("a/+", "a/#", False),
        ("a/+/c", "a/b/+", False),
        ("#", "$SYS/x", False),
        ("a/#", "a", True),
        ("a/b", "a/b/c", False),
        ("$share/g/a/#", "a/b", True),
    ],
)
def test_covers(wide: str, narrow: str, expected: bool) -> None:
    assert covers(wide, narrow) is expected


def test_broker_filters_without_identifiers_leave_out_covered_filters_and_keep_the_highest_qos() -> None:
    router = Router()
    router.add("a", ["x/+/y"], qos=1)
    router.add("b", ["x/#"], qos=0)
    router.add("c", ["z/1"], qos=2)
    assert router.broker_filters(with_ids=True) == [("x/+/y", 1, 1), ("x/#", 0, 2), ("z/1", 2, 3)]
    assert router.broker_filters(with_ids=False) == [("x/#", 1, 2), ("z/1", 2, 3)]


def test_route_cache_sees_workers_added_later() -> None:
    router = Router()
    router.add("one", ["x/#"])
    assert router.workers("x/y") == ["one"]
    router.add("two", ["x/y"])
    assert router.workers("x/y") == ["one", "two"]


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+/c", "a/b/+", True),
        ("a/#", "a", True),
        ("a", "a/b", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/+", "b/#", False),
        ("a/b/c", "a/+", False),
    ],
)
def test_overlap(first: str, second: str, expected: bool) -> None:
    assert overlap(first, second) is expected
    assert overlap(second, first) is expected


def test_only_overlapping_filters_need_subscription_ids() -> None:
    router = Router()
    router.add("a", ["x/1", "y/#"])
    router.add("b", ["x/2", "y/#"])  # the same filter twice is one subscription: one copy
    assert not router.overlapping()
    router.add("c", ["x/+"])
    assert router.overlapping()
