"""Pattern analysis for batch_scheduler: recurring habits in recorded state changes, and suggestions made of them.

Two kinds of pattern, both found by pure functions over a list of `Change`s in a window of whole local days:
- `DailyPattern`: an entity switched to the same state at about the same time of day on most days. The times of
  day of each (entity, state) are clustered on the 24-hour circle (so 23:55 and 00:05 are 10 minutes apart): the
  arc of width 2 x tolerance holding changes on the most distinct days is a pattern when those days are at least
  `min_days`, at least `min_support` of the days observed, and at least `min_lift` times as many as changes
  spread at random over the day would give (so something switching all day long is no habit); its changes are
  removed and the search repeats.
- `FollowPattern`: entity B switched to a state within `follow_minutes` after entity A switched to one, on at least
  `min_support` of A's switches, and at least `min_lift` times as often as B's changes would follow a random moment.

Confidence is support (the share of days, or of A's switches) lowered by up to half as the times spread out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import msgspec

DAY_MINUTES = 1440


@dataclass(frozen=True)
class Change:
    """Entity `entity` switched to `state` at `ts` (epoch seconds)."""

    ts: float
    entity: str
    state: str


class AnalysisSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    window_days: int = 14
    tolerance_minutes: float = 20.0
    min_support: float = 0.6
    min_days: int = 4
    follow_minutes: float = 5.0
    min_lift: float = 3.0

    def __post_init__(self) -> None:
        if not 1 <= self.window_days <= 366:
            raise ValueError(f"window_days: expected 1..366 days, found {self.window_days}")
        if not 0 < self.min_support <= 1:
            raise ValueError(f"min_support: expected a share in (0, 1], found {self.min_support}")
        if not 0 < self.tolerance_minutes <= 180:
            raise ValueError(f"tolerance_minutes: expected 0 < minutes <= 180, found {self.tolerance_minutes}")
        if self.min_days < 1 or self.follow_minutes <= 0 or self.min_lift < 1:
            raise ValueError("min_days >= 1, follow_minutes > 0 and min_lift >= 1 are required")


@dataclass(frozen=True)
class DailyPattern:
    entity: str
    state: str
    minute: int  # local time of day, minutes after midnight
    days: int  # distinct days on which it happened
    observed_days: int
    spread_minutes: float  # standard deviation of the times of day
    support: float
    confidence: float


@dataclass(frozen=True)
class FollowPattern:
    entity: str
    state: str
    trigger_entity: str
    trigger_state: str
    delay_minutes: float  # median delay after the trigger
    hits: int
    occurrences: int  # how often the trigger happened
    support: float
    lift: float
    confidence: float


Pattern = DailyPattern | FollowPattern


def analysis_window(now: float, zone: ZoneInfo, window_days: int) -> tuple[float, float]:
    """The `window_days` whole local days before the local day of `now`, as (start, end) epoch seconds."""
    today = dt.datetime.fromtimestamp(now, zone).date()
    start = today - dt.timedelta(days=window_days)
    return _midnight(start, zone), _midnight(today, zone)


def _midnight(day: dt.date, zone: ZoneInfo) -> float:
    return dt.datetime(day.year, day.month, day.day, tzinfo=zone).timestamp()


def find_patterns(
    changes: Sequence[Change], start: float, end: float, zone: ZoneInfo, settings: AnalysisSettings
) -> list[Pattern]:
    """Every daily and follow pattern in the `changes` between `start` and `end`, most confident first."""
    inside = sorted((c for c in changes if start <= c.ts < end), key=lambda c: c.ts)
    if not inside:
        return []
    first_day = dt.datetime.fromtimestamp(max(start, inside[0].ts), zone).date()
    last_day = dt.datetime.fromtimestamp(end, zone).date() - dt.timedelta(days=1)
    observed = (last_day - first_day).days + 1
    span = end - max(start, inside[0].ts)
    found: list[Pattern] = [*daily_patterns(inside, zone, observed, settings), *follow_patterns(inside, span, settings)]
    return sorted(found, key=lambda p: (-p.confidence, p.entity, p.state))


# Daily patterns ----------------------------------------------------------------------------------------------------


def daily_patterns(
    changes: Sequence[Change], zone: ZoneInfo, observed_days: int, settings: AnalysisSettings
) -> list[DailyPattern]:
    by_key: dict[tuple[str, str], list[tuple[float, dt.date]]] = defaultdict(list)
    for change in changes:
        local = dt.datetime.fromtimestamp(change.ts, zone)
        minute = local.hour * 60 + local.minute + local.second / 60
        by_key[change.entity, change.state].append((minute, local.date()))
    found = []
    for (entity, state), points in sorted(by_key.items()):
        for minutes, days in _clusters(points, observed_days, settings):
            found.append(_daily(entity, state, minutes, days, observed_days, settings))
    return found


def _clusters(
    points: list[tuple[float, dt.date]], observed_days: int, settings: AnalysisSettings
) -> list[tuple[list[float], int]]:
    """Dense arcs of the time-of-day circle: for each, its (unwrapped) minutes and its number of distinct days."""
    width = 2 * settings.tolerance_minutes
    needed = max(settings.min_days, settings.min_support * observed_days)
    by_chance = 1 - math.exp(-len(points) / observed_days * width / DAY_MINUTES)  # a day with one in any arc
    needed = max(needed, settings.min_lift * by_chance * observed_days)
    remaining = sorted(points)
    clusters = []
    while remaining:
        arc, days = _densest_arc(remaining, width)
        if days < needed:
            break
        clusters.append(([minute for minute, _, _ in arc], days))
        taken = {index for _, _, index in arc}
        remaining = [p for index, p in enumerate(remaining) if index not in taken]
    return clusters


def _densest_arc(points: list[tuple[float, dt.date]], width: float) -> tuple[list[tuple[float, dt.date, int]], int]:
    """The run of `points` (sorted by minute) spanning at most `width` minutes on the circle that holds the most
    distinct days (the tightest such run on a tie), as (minute, day, index in `points`), and its number of days.

    Going round the circle, a point's minute grows by a day and its day goes back by one: 00:05 on the 2nd is
    24:05 of the 1st, so a habit at about midnight counts each evening once."""
    one_day = dt.timedelta(days=1)
    doubled = [(m, d, i) for i, (m, d) in enumerate(points)]
    doubled += [(m + DAY_MINUTES, d - one_day, i) for m, d, i in doubled]
    days: Counter[dt.date] = Counter()
    best = (0, 0.0, 0, 0)  # days, -span, first, last
    last = 0
    for first in range(len(points)):
        while last < first + len(points) and doubled[last][0] - doubled[first][0] <= width:
            days[doubled[last][1]] += 1
            last += 1
        span = doubled[last - 1][0] - doubled[first][0]
        if (len(days), -span) > best[:2]:
            best = (len(days), -span, first, last)
        days[doubled[first][1]] -= 1
        if not days[doubled[first][1]]:
            del days[doubled[first][1]]
    return doubled[best[2] : best[3]], best[0]


def _daily(
    entity: str, state: str, minutes: list[float], days: int, observed_days: int, settings: AnalysisSettings
) -> DailyPattern:
    spread = statistics.pstdev(minutes)
    support = min(1.0, days / observed_days)
    return DailyPattern(
        entity=entity,
        state=state,
        minute=round(statistics.fmean(minutes)) % DAY_MINUTES,
        days=days,
        observed_days=observed_days,
        spread_minutes=round(spread, 1),
        support=round(support, 3),
        confidence=_confidence(support, spread, settings.tolerance_minutes),
    )


def _confidence(support: float, spread: float, tolerance: float) -> float:
    return round(support * (1 - 0.5 * min(1.0, spread / tolerance)), 3)


# Follow patterns ---------------------------------------------------------------------------------------------------


def follow_patterns(changes: Sequence[Change], span: float, settings: AnalysisSettings) -> list[FollowPattern]:
    """B switched to a state soon after A switched to one, on most of A's switches and far more than by chance
    (B's changes spread over `span` seconds would follow a random moment that soon). `changes` are sorted by time."""
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for change in changes:
        times[change.entity, change.state].append(change.ts)
    delays = _delays(changes, times, settings)
    found = []
    for (trigger, target), after in sorted(delays.items()):
        support = len(after) / len(times[trigger])
        if len(after) < settings.min_days or support < settings.min_support:
            continue
        window = settings.follow_minutes * 60
        lift = support / max(_chance(times[target], window, max(span, 1.0)), 1e-9)
        if lift >= settings.min_lift:
            found.append(_follow(trigger, target, after, len(times[trigger]), lift, settings))
    return found


def _delays(
    changes: Sequence[Change], times: dict[tuple[str, str], list[float]], settings: AnalysisSettings
) -> dict[tuple[tuple[str, str], tuple[str, str]], list[float]]:
    """For each (trigger, target) pair: the delay from each trigger change to the first target change that followed
    it within `follow_minutes` (one pass over the timeline, looking only that far ahead)."""
    window = settings.follow_minutes * 60
    delays: dict[tuple[tuple[str, str], tuple[str, str]], list[float]] = defaultdict(list)
    for index, change in enumerate(changes):
        trigger = (change.entity, change.state)
        if len(times[trigger]) < settings.min_days:
            continue
        seen = set()
        ahead = index + 1
        while ahead < len(changes) and changes[ahead].ts - change.ts <= window:
            later = changes[ahead]
            target = (later.entity, later.state)
            if later.entity != change.entity and later.ts > change.ts and target not in seen:
                seen.add(target)
                delays[trigger, target].append(later.ts - change.ts)
            ahead += 1
    return delays


def _chance(target_times: list[float], window: float, span: float) -> float:
    """The share of moments in `span` seconds that have a target within the next `window` seconds."""
    covered, reach = 0.0, float("-inf")
    for t in target_times:
        covered += t - max(t - window, reach)
        reach = t
    return min(1.0, covered / span)


def _follow(
    trigger: tuple[str, str],
    target: tuple[str, str],
    delays: list[float],
    occurrences: int,
    lift: float,
    settings: AnalysisSettings,
) -> FollowPattern:
    support = len(delays) / occurrences
    spread = statistics.pstdev(delays) / 60
    return FollowPattern(
        entity=target[0],
        state=target[1],
        trigger_entity=trigger[0],
        trigger_state=trigger[1],
        delay_minutes=round(statistics.median(delays) / 60, 1),
        hits=len(delays),
        occurrences=occurrences,
        support=round(support, 3),
        lift=round(lift, 1),
        confidence=_confidence(support, spread, settings.follow_minutes),
    )


# Suggestions -------------------------------------------------------------------------------------------------------


class Suggestion(msgspec.Struct, frozen=True, kw_only=True):
    """An automation suggested from a pattern; `id` stays the same across runs for the same habit."""

    id: str
    title: str
    entity: str
    state: str
    time: str | None  # HH:MM local, for a daily pattern
    confidence: float
    kind: str  # time_of_day | follows
    description: str  # the pattern in words (what ai_analyzer is asked to phrase)
    trigger_entity: str | None = None
    trigger_state: str | None = None


_VERBS = {
    "on": "Turn on",
    "off": "Turn off",
    "open": "Open",
    "closed": "Close",
    "locked": "Lock",
    "unlocked": "Unlock",
    "playing": "Play",
    "paused": "Pause",
}


def suggest(patterns: Sequence[Pattern], domains: Sequence[str], limit: int) -> list[Suggestion]:
    """Suggestions for the most confident patterns on entities of `domains` (those an automation can act on)."""
    wanted = [p for p in patterns if p.entity.partition(".")[0] in domains]
    return [suggestion(p) for p in wanted[:limit]]


def suggestion(pattern: Pattern) -> Suggestion:
    action = _action(pattern.entity, pattern.state)
    match pattern:
        case DailyPattern():
            time = f"{pattern.minute // 60:02d}:{pattern.minute % 60:02d}"
            bucket = round(pattern.minute / 30) * 30 % DAY_MINUTES  # the half hour it is nearest to
            return Suggestion(
                id=_stable_id("time_of_day", pattern.entity, pattern.state, str(bucket)),
                title=f"{action} at {time}",
                entity=pattern.entity,
                state=pattern.state,
                time=time,
                confidence=pattern.confidence,
                kind="time_of_day",
                description=f"{pattern.entity} changed to {pattern.state} at about {time} on {pattern.days} of the "
                f"last {pattern.observed_days} days",
            )
        case FollowPattern():
            return Suggestion(
                id=_stable_id("follows", pattern.entity, pattern.state, pattern.trigger_entity, pattern.trigger_state),
                title=f"{action} when {pattern.trigger_entity} changes to {pattern.trigger_state}",
                entity=pattern.entity,
                state=pattern.state,
                time=None,
                confidence=pattern.confidence,
                kind="follows",
                description=f"{pattern.entity} changed to {pattern.state} about {pattern.delay_minutes:g} minutes "
                f"after {pattern.trigger_entity} changed to {pattern.trigger_state}, {pattern.hits} of "
                f"{pattern.occurrences} times",
                trigger_entity=pattern.trigger_entity,
                trigger_state=pattern.trigger_state,
            )


def _action(entity: str, state: str) -> str:
    verb = _VERBS.get(state)
    return f"{verb} {entity}" if verb else f"Set {entity} to {state}"


def _stable_id(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]
