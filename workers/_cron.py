"""Schedule maths for batch_scheduler: 5-field cron expressions and intervals, next fire times in a time zone.

`Cron.parse("30 3 * * mon-fri")` reads an expression (minute hour day-of-month month day-of-week; `*`, lists,
ranges, steps, names like `jan` and `mon`, 0 or 7 for Sunday) and raises ValueError naming the expression, the
field and the fix. When both day-of-month and day-of-week are restricted, a day matches if either does (as cron).

Daylight-saving time, as Vixie cron and systemd handle it (every time is a wall-clock time in the zone):
- A job with fixed hours runs once on each matching day. A time the clock skips (02:30 on a spring-forward day in
  Europe/Berlin) runs when the gap ends (03:00); a time that occurs twice (02:30 on a fall-back day) runs at its
  first occurrence only.
- A job whose hour field is `*` follows the wall clock: it skips the times that do not exist and runs in both
  copies of a repeated hour, so it keeps its rhythm in real time.

All functions are pure: time (epoch seconds) comes in as an argument.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from zoneinfo import ZoneInfo

_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_MONTH_LENGTH = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # the longest each month can be
_SEARCH_DAYS = 366 * 9  # long enough for the 29th of February (up to 8 years apart)


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: list[str] | None = None
    name_base: int = 0  # the number of names[0]


_FIELDS = [
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, _MONTHS, 1),
    _Field("day-of-week", 0, 7, _DAYS, 0),
]


@dataclass(frozen=True)
class Cron:
    """A parsed 5-field cron expression; `next_after` gives its fire times."""

    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, expression: str) -> Cron:
        """Read `expression`; raises ValueError saying which field is wrong and what is allowed."""
        parts = expression.split()
        if len(parts) != 5:
            raise ValueError(
                f'cron "{expression}": expected 5 fields (minute hour day-of-month month day-of-week), '
                f"found {len(parts)}"
            )
        values = [_parse_field(expression, field, part) for field, part in zip(_FIELDS, parts, strict=True)]
        cron = cls(
            expression=expression,
            minutes=tuple(sorted(values[0])),
            hours=tuple(sorted(values[1])),
            days=frozenset(values[2]),
            months=frozenset(values[3]),
            weekdays=frozenset(d % 7 for d in values[4]),
            days_restricted=not parts[2].startswith("*"),
            weekdays_restricted=not parts[4].startswith("*"),
        )
        cron._check_fires()
        return cron

    def _check_fires(self) -> None:
        if self.weekdays_restricted or not self.days_restricted:
            return
        if not any(min(self.days) <= _MONTH_LENGTH[month - 1] for month in self.months):
            months = ", ".join(_MONTHS[m - 1] for m in sorted(self.months))
            raise ValueError(f'cron "{self.expression}": never fires (day {min(self.days)} does not occur in {months})')

    @property
    def every_hour(self) -> bool:
        return len(self.hours) == 24

    def matches_day(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        in_days = day.day in self.days
        in_weekdays = day.isoweekday() % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return in_days or in_weekdays
        return in_days and in_weekdays

    def next_after(self, after: float, zone: ZoneInfo) -> float:
        """The first fire time (epoch seconds) later than `after`."""
        start = dt.datetime.fromtimestamp(after, zone).date() - dt.timedelta(days=1)
        for offset in range(_SEARCH_DAYS):
            day = start + dt.timedelta(days=offset)
            if self.matches_day(day):
                later = [t for t in self.fire_times(day, zone) if t > after]
                if later:
                    return min(later)
        raise ValueError(f'cron "{self.expression}": no fire time within {_SEARCH_DAYS // 366} years')

    def fire_times(self, day: dt.date, zone: ZoneInfo) -> Iterator[float]:
        """The instants at which this schedule fires on local date `day` (assumed to match), in wall-clock order."""
        for hour in self.hours:
            for minute in self.minutes:
                wall = dt.datetime(day.year, day.month, day.day, hour, minute)
                yield from self._instants(wall, zone)

    def _instants(self, wall: dt.datetime, zone: ZoneInfo) -> Iterator[float]:
        first = wall.replace(tzinfo=zone, fold=0).timestamp()
        second = wall.replace(tzinfo=zone, fold=1).timestamp()
        if _local(first, zone) == wall:  # it exists: once, or twice in a fall-back hour
            yield first
            if second != first and self.every_hour:
                yield second
        elif not self.every_hour:  # skipped by a spring-forward change: run when the gap ends
            yield _gap_end(wall, zone, min(first, second), max(first, second))


def _local(instant: float, zone: ZoneInfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(instant, zone).replace(tzinfo=None, fold=0)


def _gap_end(wall: dt.datetime, zone: ZoneInfo, before: float, after: float) -> float:
    """The first instant whose local time is past `wall`, which the clock skipped; `before` shows a local time before
    `wall`, `after` one past it."""
    low, high = int(before), int(after)
    while high - low > 1:
        middle = (low + high) // 2
        if _local(middle, zone) < wall:
            low = middle
        else:
            high = middle
    return float(high)


def _parse_field(expression: str, field: _Field, text: str) -> set[int]:
    values: set[int] = set()
    for item in text.split(","):
        values |= _parse_item(expression, field, item)
    return values


def _parse_item(expression: str, field: _Field, item: str) -> set[int]:
    where = f'cron "{expression}": {field.name}'
    span, _, step_text = item.partition("/")
    step = 1
    if step_text:
        if not step_text.isdigit() or int(step_text) == 0:
            raise ValueError(f"{where} step {step_text!r} is not a whole number >= 1")
        step = int(step_text)
    if span == "*":
        low, high = field.low, field.high if field.name != "day-of-week" else 6
    elif "-" in span:
        first, _, last = span.partition("-")
        low, high = _number(where, field, first), _number(where, field, last)
        if low > high:
            raise ValueError(f"{where} range {span} goes backwards; split it into two ascending ranges")
    else:
        low = _number(where, field, span)
        high = field.high if step_text else low  # "5/15" means 5, 20, 35, 50 (as Vixie cron)
    return set(range(low, high + 1, step))


def _number(where: str, field: _Field, text: str) -> int:
    if field.names and text.lower() in field.names:
        return field.names.index(text.lower()) + field.name_base
    if not text.isdigit():
        names = f" or a name ({', '.join(field.names)})" if field.names else ""
        raise ValueError(f"{where} {text!r} is not a number{names}")
    value = int(text)
    if not field.low <= value <= field.high:
        raise ValueError(f"{where} {value} is out of range {field.low}-{field.high}")
    return value


# Schedules ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CronSchedule:
    """Fires at the times of a cron expression, read in a time zone."""

    cron: Cron
    zone: ZoneInfo

    def next_after(self, after: float) -> float:
        return self.cron.next_after(after, self.zone)

    def period(self, after: float) -> float:
        """Seconds between the next two fire times after `after` (for display)."""
        first = self.next_after(after)
        return self.next_after(first) - first


@dataclass(frozen=True)
class IntervalSchedule:
    """Fires every `seconds`, counted from the last run."""

    seconds: float

    def next_after(self, after: float) -> float:
        return after + self.seconds

    def period(self, after: float) -> float:
        return self.seconds


Schedule = CronSchedule | IntervalSchedule


def missed_run(schedule: Schedule, last_run: float, now: float) -> bool:
    """True when `schedule` should have fired between the last run and `now`: a run missed while the host was down,
    to be caught up once (as systemd timers' `Persistent=`)."""
    return schedule.next_after(last_run) <= now
