"""Schedule maths: parsing cron expressions, next fire times across DST changes, intervals, catch-up decisions.

Time is injected: every function takes epoch seconds, so nothing here waits for the clock.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from workers._cron import Cron, CronSchedule, IntervalSchedule, missed_run

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, zone: ZoneInfo = BERLIN) -> float:
    """Epoch seconds of a local wall-clock time (the first occurrence when it is ambiguous)."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def local(instant: float, zone: ZoneInfo = BERLIN) -> str:
    return dt.datetime.fromtimestamp(instant, zone).isoformat()


def fires(expression: str, after: str, count: int, zone: ZoneInfo = BERLIN) -> list[str]:
    cron, instant, found = Cron.parse(expression), at(after, zone), []
    for _ in range(count):
        instant = cron.next_after(instant, zone)
        found.append(local(instant, zone))
    return found


# Parsing -------------------------------------------------------------------------------------------------------------


def test_fields_accept_lists_ranges_steps_and_names() -> None:
    cron = Cron.parse("0,30 8-10 */10 jan,Jul mon-fri")
    assert cron.minutes == (0, 30)
    assert cron.hours == (8, 9, 10)
    assert cron.days == frozenset({1, 11, 21, 31})
    assert cron.months == frozenset({1, 7})
    assert cron.weekdays == frozenset({1, 2, 3, 4, 5})


def test_a_step_on_a_range_or_a_start_counts_from_its_first_value() -> None:
    assert Cron.parse("10-30/10 * * * *").minutes == (10, 20, 30)
    assert Cron.parse("5/20 * * * *").minutes == (5, 25, 45)


def test_sunday_is_0_or_7_and_star_covers_every_weekday() -> None:
    assert Cron.parse("0 0 * * 7").weekdays == frozenset({0})
    assert Cron.parse("0 0 * * 5-7").weekdays == frozenset({5, 6, 0})
    assert Cron.parse("0 0 * * *").weekdays == frozenset(range(7))


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # The 13th of each month, and every Friday (cron's rule): not only Friday the 13th.
    assert fires("0 12 13 * fri", "2024-09-01T00:00", 4) == [
        "2024-09-06T12:00:00+02:00",
        "2024-09-13T12:00:00+02:00",
        "2024-09-20T12:00:00+02:00",
        "2024-09-27T12:00:00+02:00",
    ]
    # With one of them `*`, the other alone decides.
    assert fires("0 12 13 * *", "2024-09-01T00:00", 2) == ["2024-09-13T12:00:00+02:00", "2024-10-13T12:00:00+02:00"]


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("61 * * * *", r'^cron "61 \* \* \* \*": minute 61 is out of range 0-59$'),
        ("0 24 * * *", r'^cron "0 24 \* \* \*": hour 24 is out of range 0-23$'),
        ("0 0 0 * *", r'^cron "0 0 0 \* \*": day-of-month 0 is out of range 1-31$'),
        ("0 0 * 13 *", r'^cron "0 0 \* 13 \*": month 13 is out of range 1-12$'),
        ("0 0 * * 8", r'^cron "0 0 \* \* 8": day-of-week 8 is out of range 0-7$'),
        ("* * * *", r'^cron "\* \* \* \*": expected 5 fields \(minute hour day-of-month month day-of-week\), found 4$'),
        ("*/0 * * * *", r'^cron "\*/0 \* \* \* \*": minute step \'0\' is not a whole number >= 1$'),
        ("0 0 * * fri-mon", r'^cron "0 0 \* \* fri-mon": day-of-week range fri-mon goes backwards; split it'),
        ("0 0 * foo *", r"^cron \"0 0 \* foo \*\": month 'foo' is not a number or a name \(jan, feb,"),
        ("0 0 31 feb *", r'^cron "0 0 31 feb \*": never fires \(day 31 does not occur in feb\)$'),
        ("@daily", r'^cron "@daily": expected 5 fields'),
    ],
)
def test_invalid_expressions_say_which_field_is_wrong(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Cron.parse(expression)


# Next fire times -----------------------------------------------------------------------------------------------------


def test_next_fire_is_strictly_after_the_given_time() -> None:
    cron = Cron.parse("30 3 * * *")
    assert local(cron.next_after(at("2024-06-01T03:30"), BERLIN)) == "2024-06-02T03:30:00+02:00"
    assert local(cron.next_after(at("2024-06-01T03:29:59"), BERLIN)) == "2024-06-01T03:30:00+02:00"


def test_weekday_and_month_names_pick_the_right_days() -> None:
    assert fires("0 9 * * mon", "2024-06-01T00:00", 2) == ["2024-06-03T09:00:00+02:00", "2024-06-10T09:00:00+02:00"]
    assert fires("0 0 1 jan *", "2024-06-01T00:00", 1) == ["2025-01-01T00:00:00+01:00"]
    assert fires("0 0 29 2 *", "2024-03-01T00:00", 1) == ["2028-02-29T00:00:00+01:00"]


def test_the_same_wall_clock_time_keeps_across_dst_in_its_zone_and_moves_in_utc() -> None:
    berlin = fires("0 7 * * *", "2024-03-30T08:00", 1)
    assert berlin == ["2024-03-31T07:00:00+02:00"]
    assert fires("0 7 * * *", "2024-03-30T08:00", 1, ZoneInfo("UTC")) == ["2024-03-31T07:00:00+00:00"]


def test_a_time_skipped_by_spring_forward_runs_once_when_the_gap_ends() -> None:
    # Europe/Berlin, 2024-03-31: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist that day.
    assert fires("30 2 * * *", "2024-03-30T12:00", 3) == [
        "2024-03-31T03:00:00+02:00",
        "2024-04-01T02:30:00+02:00",
        "2024-04-02T02:30:00+02:00",
    ]
    # Several skipped times of one job still make one run.
    assert fires("*/15 2 * * *", "2024-03-31T00:00", 2) == ["2024-03-31T03:00:00+02:00", "2024-04-01T02:00:00+02:00"]


def test_a_time_repeated_by_fall_back_runs_once_at_its_first_occurrence() -> None:
    # Europe/Berlin, 2024-10-27: 03:00 CEST goes back to 02:00 CET, so 02:30 happens twice.
    assert fires("30 2 * * *", "2024-10-26T12:00", 3) == [
        "2024-10-27T02:30:00+02:00",
        "2024-10-28T02:30:00+01:00",
        "2024-10-29T02:30:00+01:00",
    ]


def test_an_hourly_job_follows_the_wall_clock_through_both_changes() -> None:
    assert fires("30 * * * *", "2024-03-31T00:00", 3) == [
        "2024-03-31T00:30:00+01:00",
        "2024-03-31T01:30:00+01:00",
        "2024-03-31T03:30:00+02:00",
    ]
    assert fires("30 * * * *", "2024-10-27T01:00", 3) == [
        "2024-10-27T01:30:00+02:00",
        "2024-10-27T02:30:00+02:00",
        "2024-10-27T02:30:00+01:00",
    ]


def test_cron_schedule_reports_its_period() -> None:
    assert CronSchedule(Cron.parse("30 3 * * *"), BERLIN).period(at("2024-06-01T00:00")) == 86400
    assert CronSchedule(Cron.parse("*/10 * * * *"), BERLIN).period(at("2024-06-01T00:00")) == 600


# Intervals and catch-up ----------------------------------------------------------------------------------------------


def test_an_interval_schedule_fires_its_interval_after_the_last_run() -> None:
    schedule = IntervalSchedule(3600)
    assert schedule.next_after(1_000_000.0) == 1_003_600.0
    assert schedule.period(0) == 3600


def test_a_run_missed_while_the_host_was_down_is_caught_up() -> None:
    daily = CronSchedule(Cron.parse("30 3 * * *"), BERLIN)
    last_run = at("2024-06-01T03:30")
    assert not missed_run(daily, last_run, at("2024-06-02T03:29"))  # down over night, back before the next run
    assert missed_run(daily, last_run, at("2024-06-02T03:31"))  # down at 03:30: catch up
    assert missed_run(daily, last_run, at("2024-06-09T12:00"))  # a week down: still one catch-up decision


def test_an_interval_missed_while_down_is_caught_up() -> None:
    hourly = IntervalSchedule(3600)
    assert not missed_run(hourly, 1_000_000.0, 1_003_599.0)
    assert missed_run(hourly, 1_000_000.0, 1_003_600.0)
