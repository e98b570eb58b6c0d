"""Pattern analysis on synthetic history: planted habits are found exactly, seeded random noise yields nothing.

Everything is pure: the history is built from a seeded `random.Random` and the analysis gets its window and time
zone as arguments.
"""

from __future__ import annotations

import datetime as dt
import random
from zoneinfo import ZoneInfo

import pytest

from workers._patterns import (
    AnalysisSettings,
    Change,
    DailyPattern,
    FollowPattern,
    Pattern,
    analysis_window,
    find_patterns,
    suggest,
    suggestion,
)

BERLIN = ZoneInfo("Europe/Berlin")
TODAY = dt.date(2024, 6, 15)  # the analysis runs early on this day; the window is the 14 days before it
NOW = dt.datetime(2024, 6, 15, 3, 30, tzinfo=BERLIN).timestamp()
SETTINGS = AnalysisSettings()
DOMAINS = ["light", "switch", "cover"]


def at(day: dt.date, minute: float) -> float:
    """Epoch seconds of the local wall-clock time `minute` minutes after midnight of `day` (past 1440: the next day)."""
    wall = dt.datetime(day.year, day.month, day.day) + dt.timedelta(minutes=minute)
    return wall.replace(tzinfo=BERLIN).timestamp()


def window_days() -> list[dt.date]:
    return [TODAY - dt.timedelta(days=n) for n in range(14, 0, -1)]


def noise(rng: random.Random) -> list[Change]:
    """Entities switching at random times of day, 0 to 6 times a day."""
    changes = []
    for day in window_days():
        for entity in ["light.bedroom", "switch.fan", "cover.blinds", "binary_sensor.door", "light.hall"]:
            for _ in range(rng.randint(0, 6)):
                changes.append(Change(at(day, rng.uniform(0, 1440)), entity, rng.choice(["on", "off"])))
    return changes


def planted(rng: random.Random) -> list[Change]:
    changes = []
    days = window_days()
    for day in rng.sample(days, 12):  # light.hall on at 07:00 +- 10 min on 12 of 14 days
        changes.append(Change(at(day, 7 * 60 + rng.uniform(-10, 10)), "light.hall", "on"))
    for day in rng.sample(days, 11):  # switch.coffee off at 23:55 +- 10 min, often past midnight
        changes.append(Change(at(day, 23 * 60 + 55 + rng.uniform(-10, 10)), "switch.coffee", "off"))
    for day in days[1:]:  # the kitchen light at a random morning time; the coffee machine 1-4 min later, mostly
        kitchen = at(day, rng.uniform(5 * 60, 10 * 60))
        changes.append(Change(kitchen, "light.kitchen", "on"))
        changes.append(Change(kitchen + rng.uniform(2 * 3600, 6 * 3600), "light.kitchen", "off"))
        if rng.random() < 0.85:
            changes.append(Change(kitchen + rng.uniform(60, 240), "switch.coffee_machine", "on"))
        changes.append(Change(kitchen + rng.uniform(3600, 7200), "switch.coffee_machine", "off"))
    return changes


def analyse(changes: list[Change], settings: AnalysisSettings = SETTINGS) -> list[Pattern]:
    start, end = analysis_window(NOW, BERLIN, settings.window_days)
    return find_patterns(changes, start, end, BERLIN, settings)


def kinds(patterns: list[Pattern]) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    for p in patterns:
        match p:
            case DailyPattern():
                found.add(("daily", p.entity, p.state))
            case FollowPattern():
                found.add(("follows", p.entity, p.state, p.trigger_entity, p.trigger_state))
    return found


def minutes_apart(a: int, b: int) -> int:
    return min(abs(a - b), 1440 - abs(a - b))


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_planted_patterns_are_found_exactly_and_none_from_noise(seed: int) -> None:
    rng = random.Random(seed)
    habits = planted(rng)
    patterns = analyse(habits + noise(rng))
    assert kinds(patterns) == {
        ("daily", "light.hall", "on"),
        ("daily", "switch.coffee", "off"),
        ("follows", "switch.coffee_machine", "on", "light.kitchen", "on"),
    }
    daily = {p.entity: p for p in patterns if isinstance(p, DailyPattern)}
    assert minutes_apart(daily["light.hall"].minute, 7 * 60) <= 5
    assert (daily["light.hall"].days, daily["light.hall"].observed_days) == (12, 14)
    assert minutes_apart(daily["switch.coffee"].minute, 23 * 60 + 55) <= 5
    # Each evening once, whichever side of midnight it fell (one past the window's end is not counted).
    _, end = analysis_window(NOW, BERLIN, 14)
    evenings = [c for c in habits if c.entity == "switch.coffee" and c.ts < end]
    assert daily["switch.coffee"].days == len(evenings) >= 10
    (follow,) = [p for p in patterns if isinstance(p, FollowPattern)]
    assert 1 <= follow.delay_minutes <= 4
    assert 0.6 <= follow.support <= 1.0


@pytest.mark.parametrize("seed", range(10))
def test_noise_alone_yields_no_pattern(seed: int) -> None:
    assert analyse(noise(random.Random(seed))) == []


def test_a_habit_on_fewer_days_than_the_minimum_support_is_not_a_pattern() -> None:
    rng = random.Random(7)
    changes = [Change(at(day, 7 * 60 + rng.uniform(-5, 5)), "light.hall", "on") for day in window_days()[:8]]
    assert analyse(changes) == []  # 8 of 14 days < 0.6
    changes.append(Change(at(window_days()[8], 7 * 60), "light.hall", "on"))
    assert kinds(analyse(changes)) == {("daily", "light.hall", "on")}  # 9 of 14 >= 0.6


def test_changes_spread_wider_than_the_tolerance_are_not_a_pattern() -> None:
    changes = [Change(at(day, 6 * 60 + 30 * n), "light.hall", "on") for n, day in enumerate(window_days())]
    assert analyse(changes) == []


def test_history_shorter_than_the_window_counts_only_the_days_observed() -> None:
    days = window_days()[-5:]  # recording started five days ago
    changes = [Change(at(day, 7 * 60), "light.hall", "on") for day in days]
    (pattern,) = analyse(changes)
    assert isinstance(pattern, DailyPattern)
    assert (pattern.days, pattern.observed_days, pattern.support) == (5, 5, 1.0)


def test_something_that_switches_all_day_long_is_no_habit_and_follows_nothing() -> None:
    changes = []
    for day in window_days():
        changes.append(Change(at(day, 8 * 60), "light.kitchen", "on"))
        changes.extend(Change(at(day, m), "switch.pump", "on") for m in range(0, 1440, 3))
    assert kinds(analyse(changes)) == {("daily", "light.kitchen", "on")}


def test_the_window_is_whole_local_days_before_today_across_dst() -> None:
    start, end = analysis_window(dt.datetime(2024, 4, 2, 3, 30, tzinfo=BERLIN).timestamp(), BERLIN, 3)
    assert dt.datetime.fromtimestamp(start, BERLIN).isoformat() == "2024-03-30T00:00:00+01:00"
    assert dt.datetime.fromtimestamp(end, BERLIN).isoformat() == "2024-04-02T00:00:00+02:00"
    assert end - start == 3 * 86400 - 3600  # the spring-forward day has 23 hours


def test_times_of_day_are_local_so_a_habit_keeps_across_a_dst_change() -> None:
    now = dt.datetime(2024, 4, 7, 3, 0, tzinfo=BERLIN).timestamp()
    start, end = analysis_window(now, BERLIN, 14)
    days = [dt.date(2024, 4, 7) - dt.timedelta(days=n) for n in range(14, 0, -1)]
    changes = [Change(at(day, 7 * 60), "light.hall", "on") for day in days]
    (pattern,) = find_patterns(changes, start, end, BERLIN, SETTINGS)
    assert isinstance(pattern, DailyPattern)
    assert (pattern.minute, pattern.days) == (7 * 60, 14)


# Suggestions --------------------------------------------------------------------------------------------------------


def daily(minute: int, entity: str = "light.hall", state: str = "on", confidence: float = 0.8) -> DailyPattern:
    return DailyPattern(
        entity=entity,
        state=state,
        minute=minute,
        days=10,
        observed_days=14,
        spread_minutes=4.0,
        support=0.714,
        confidence=confidence,
    )


def test_a_suggestion_keeps_its_id_while_its_time_stays_in_the_same_half_hour() -> None:
    assert suggestion(daily(6 * 60 + 50)).id == suggestion(daily(7 * 60 + 12)).id
    assert suggestion(daily(6 * 60 + 50)).id != suggestion(daily(7 * 60 + 20)).id
    assert suggestion(daily(7 * 60)).id != suggestion(daily(7 * 60, state="off")).id


def test_a_daily_suggestion_has_a_template_title_and_its_local_time() -> None:
    made = suggestion(daily(23 * 60 + 55, "switch.coffee", "off"))
    assert (made.title, made.entity, made.time, made.confidence) == (
        "Turn off switch.coffee at 23:55",
        "switch.coffee",
        "23:55",
        0.8,
    )
    assert suggestion(daily(8 * 60, "cover.blinds", "open")).title == "Open cover.blinds at 08:00"
    assert suggestion(daily(8 * 60, "climate.living", "heat")).title == "Set climate.living to heat at 08:00"


def test_suggestions_are_made_for_actionable_domains_only_most_confident_first() -> None:
    patterns: list[Pattern] = [
        daily(7 * 60, "light.hall", confidence=0.9),
        daily(8 * 60, "binary_sensor.door", confidence=0.85),
        daily(9 * 60, "switch.fan", confidence=0.7),
        daily(10 * 60, "cover.blinds", confidence=0.6),
    ]
    assert [s.entity for s in suggest(patterns, DOMAINS, limit=2)] == ["light.hall", "switch.fan"]
