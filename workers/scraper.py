"""The scraper: upcoming items (events at a venue: date, title, time) read from configured web pages.

Consumes: its `refresh` command (the Home Assistant button `Refresh`) and, with `short_names`, the ai_analyzer's
replies (`contracts.ai.AiReply`) on `<base>/<name>/ai_reply` (local).

Produces, retained and only when the list changed: the list (JSON `{"count": n, "items": [...]}`) on `topic`
(default `<base>/<name>/events`) and its first item on `<topic>/next`; after every run, its time, trigger
(startup / interval / command) and result on `<topic>/last_run` and in the supervisor's status. With `short_names`,
asks the ai_analyzer (`contracts.ai.AiRequest`, local) for short titles and republishes the list with them. Declares
the Home Assistant entities: event count, next event (with its details as attributes), last run, a Refresh button.

Touches outside: the configured web pages (HTTP GET on a background thread; see `workers._scraping`) and
`scraper.json` in its state directory (conditional-GET validators and last good items per source, the hash of the
published list, short titles), so that a restart neither refetches nor republishes what did not change.

Runs: at start, every `interval_seconds` plus up to `jitter_seconds`, and on `refresh`; never two at once (a refresh
asked during a run makes one more run right after it). A source that fails is counted as a `scrape` error (detail
`network: ...`, `http_status: ...` or `parse: ...`) and its last good items stay in the list.
"""

from __future__ import annotations

import hashlib
import random
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from contracts import Command, Context, Message, Subscription, Timer, Trigger, Worker
from contracts.ai import AiReply, AiRequest, request_topic
from contracts.homeassistant import Button, Entity, Sensor
from contracts.state import write_atomically
from workers._scraping import Http, Item, Outcome, Source, Validators, scrape

MIN_INTERVAL_SECONDS = 60
STATE_FILE = "scraper.json"
AI_REQUEST_PATIENCE_SECONDS = 600.0  # titles asked for and not answered by then are asked for again


class ScraperConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    sources: Annotated[list[Source], msgspec.Meta(min_length=1)]
    interval_seconds: Annotated[int, msgspec.Meta(ge=MIN_INTERVAL_SECONDS)] = 3600
    jitter_seconds: Annotated[float, msgspec.Meta(ge=0)] = 60.0  # added at random to each interval, spreading load
    timezone: str = "UTC"  # of the dates on the pages: "today" and past items are judged in it
    topic: str = ""  # empty: <base>/<worker name>/events
    max_items: Annotated[int, msgspec.Meta(ge=1)] = 50
    short_names: bool = True  # ask the ai_analyzer for short titles (`short_title` in each item)
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = 15.0  # per attempt
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 2  # after network errors, 429 and 5xx
    retry_backoff_seconds: Annotated[float, msgspec.Meta(ge=0)] = 2.0  # doubled after each retry
    max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 2_000_000
    user_agent: str = "mqtt-home-supervisor-scraper/1 (home automation; one request per page per interval)"

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            zone = self.timezone
            raise ValueError(f"timezone: expected an IANA time zone such as 'Europe/Berlin', found {zone!r}") from None
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: expected each source to have its own name, found {names}")
        if any(c in self.topic for c in "+#"):
            raise ValueError(f"topic: expected a topic without wildcards, found {self.topic!r}")

    def http(self) -> Http:
        return Http(
            timeout_seconds=self.timeout_seconds,
            retries=self.retries,
            backoff_seconds=self.retry_backoff_seconds,
            user_agent=self.user_agent,
            max_bytes=self.max_bytes,
        )


# Published documents and saved state -------------------------------------------------------------------------------


class ItemList(msgspec.Struct, frozen=True, kw_only=True):
    """The retained list on `topic`."""

    count: int
    items: list[Item]


class LastRun(msgspec.Struct, frozen=True, kw_only=True):
    """The retained summary of the last run on `<topic>/last_run`."""

    time: str  # ISO 8601
    trigger: Trigger
    changed: bool  # the list was republished
    failed_sources: list[str]
    next_run: str | None  # when the next scheduled run is due; None while another run follows at once


class SourceState(msgspec.Struct, kw_only=True):
    fingerprint: str  # of the source's config: a changed source starts afresh
    validators: Validators = Validators()
    items: list[Item] = msgspec.field(default_factory=list)  # the last good ones, past ones included


class SavedState(msgspec.Struct, kw_only=True):
    sources: dict[str, SourceState] = msgspec.field(default_factory=dict)
    published_hash: str = ""
    short_titles: dict[str, str] = msgspec.field(default_factory=dict)  # title -> short title, from the model
    # title -> short title made by rules while the model failed: shown (also after a restart, so that the list is
    # the same one), and the model is asked again at the next run
    provisional_titles: dict[str, str] = msgspec.field(default_factory=dict)


class AskedTitles(msgspec.Struct, frozen=True, kw_only=True):
    titles: list[str]
    at: float


class Topics(msgspec.Struct, frozen=True, kw_only=True):
    events: str
    next: str
    last_run: str
    ai_reply: str
    ai_request: str

    @classmethod
    def of(cls, ctx: Context, config: ScraperConfig) -> Topics:
        site = ctx.site
        events = config.topic or site.worker_own_topic(ctx.name, "events")
        return cls(
            events=events,
            next=f"{events}/next",
            last_run=f"{events}/last_run",
            ai_reply=site.worker_own_topic(ctx.name, "ai_reply"),
            ai_request=request_topic(site.base_topic),
        )


_encoder = msgspec.json.Encoder()
_state_decoder = msgspec.json.Decoder(SavedState)


# The worker --------------------------------------------------------------------------------------------------------


class Scraper(Worker[ScraperConfig]):
    """Scrapes dated items from web pages on an interval and on demand; see the module docstring."""

    name = "scraper"
    title = "Web scraper"
    example_config: ClassVar[dict[str, Any]] = {
        "short_names": False,
        "sources": [
            {
                "name": "example",
                "url": "file:deploy/examples/events.html",
                "container": "main#events",
                "items": "li.event",
                "date_format": "%d.%m",
                "fields": {"title": "h3", "date": "time.date", "time": "span.time"},
            }
        ],
    }
    error_kinds = ("scrape",)
    memory_limit_mb = 128  # resident MiB; a section's memory_limit_mb overrides it
    Config = ScraperConfig

    def example_message(self) -> tuple[str, bytes]:
        return self.site.command_topic(self.name, "refresh"), b"PRESS"

    def on_start(self, ctx: Context) -> None:
        self.zone = ZoneInfo(self.config.timezone)
        self.http = self.config.http()
        self.topics = Topics.of(ctx, self.config)
        self.state = load_state(ctx.state_dir / STATE_FILE, ctx)
        self.running = False
        self.again: Trigger | None = None  # a run asked for while one was under way
        self.next_run: Timer | None = None
        self.stopping = threading.Event()
        self.asked: dict[str, AskedTitles] = {}  # AI requests not answered yet, by id
        ctx.declare(entities(self.topics, ctx.command_topic("refresh")))
        if self.config.short_names:
            reply = Subscription(self.topics.ai_reply, qos=1, handler=self.short_titles_came, type=AiReply)
            ctx.subscribe(reply)
        ctx.report_status(interval_seconds=self.config.interval_seconds)
        self.run(ctx, "startup")

    def short_titles_came(self, ctx: Context, reply: AiReply, message: Message) -> None:
        self.merge_short_titles(ctx, reply)

    def on_command(self, ctx: Context, command: Command) -> None:
        match command.name:
            case "refresh":
                self.run(ctx, "command")
            case _:
                super().on_command(ctx, command)

    def on_stop(self, ctx: Context) -> None:
        self.stopping.set()  # cuts a retry's backoff short
        if self.next_run is not None:
            self.next_run.cancel()
        save_state(ctx.state_dir / STATE_FILE, self.state)

    # Runs ----------------------------------------------------------------------------------------------------------

    def run(self, ctx: Context, trigger: Trigger) -> None:
        """Scrape every source now, or once more right after the run under way."""
        if self.running:
            ctx.log.info("%s run asked while a run is under way: one more run follows it", trigger)
            self.again = "command" if "command" in (trigger, self.again) else trigger
            return
        self.running = True
        if self.next_run is not None:
            self.next_run.cancel()
        jobs = [(source, self.saved(source).validators) for source in self.config.sources]
        http, today, zone, stopping = self.http, self.today(ctx), self.zone, self.stopping

        def work() -> list[Outcome]:  # on a background thread: touches nothing of the worker's
            return [scrape(source, validators, http, today, zone, stopping) for source, validators in jobs]

        ctx.run_in_thread(work, lambda future: self.finished(ctx, trigger, future))

    def finished(self, ctx: Context, trigger: Trigger, future: Future[list[Outcome]]) -> None:
        self.running = False
        again, self.again = self.again, None
        due = self.schedule(ctx) if again is None else None  # first: a bug below must not stop the schedule
        try:
            self.report(ctx, trigger, future.result(), due)
        finally:
            if again is not None and not self.stopping.is_set():
                self.run(ctx, again)

    def schedule(self, ctx: Context) -> float | None:
        """Schedule the next interval run; returns when it is due (None when stopping)."""
        if self.stopping.is_set():
            return None
        delay = next_delay(self.config.interval_seconds, self.config.jitter_seconds)
        self.next_run = ctx.call_later(delay, lambda: self.run(ctx, "interval"))
        return ctx.now() + delay

    def report(self, ctx: Context, trigger: Trigger, outcomes: list[Outcome], due: float | None) -> None:
        """Take in a finished run: count its errors, publish what changed, say when it ran, ask for short titles."""
        failed = self.absorb(ctx, outcomes)
        changed = self.publish(ctx)
        now = ctx.now()
        last_run = LastRun(
            time=_iso(now, self.zone),
            trigger=trigger,
            changed=changed,
            failed_sources=failed,
            next_run=None if due is None else _iso(due, self.zone),
        )
        ctx.publish(self.topics.last_run, _encoder.encode(last_run), qos=1, retain=True)
        ctx.report_status(
            last_run_ts=now, last_run_trigger=trigger, last_run_ok=not failed, event_count=len(self.upcoming(ctx))
        )
        self.forget_old_short_titles()
        save_state(ctx.state_dir / STATE_FILE, self.state)
        self.ask_for_short_titles(ctx)

    def absorb(self, ctx: Context, outcomes: Iterable[Outcome]) -> list[str]:
        """Keep what each source gave, count what failed; returns the names of the sources that failed."""
        failed = []
        for outcome in outcomes:
            source = outcome.source
            if outcome.error is not None:
                failed.append(source)
                ctx.report_error("scrape", f"{outcome.error} (source {source!r})")
                continue
            if outcome.skipped:
                count = len(outcome.skipped) + len(outcome.items or [])
                detail = f"skipped {len(outcome.skipped)} of {count} items; {outcome.skipped[0]}"
                ctx.report_error("scrape", f"parse: {detail} (source {source!r})")
            if outcome.items is not None:
                saved = self.saved(self.source(source))
                saved.validators, saved.items = outcome.validators, outcome.items
        return failed

    # Publishing ----------------------------------------------------------------------------------------------------

    def publish(self, ctx: Context) -> bool:
        """Publish the list and its next item (retained) if either changed since the last time; True if so."""
        items = self.upcoming(ctx)
        payload = _encoder.encode(ItemList(count=len(items), items=items))
        digest = list_hash(self.topics.events, payload)
        if digest == self.state.published_hash:
            return False
        ctx.publish(self.topics.events, payload, qos=1, retain=True)
        ctx.publish(self.topics.next, _encoder.encode(items[0]) if items else b"{}", qos=1, retain=True)
        self.state.published_hash = digest
        return True

    def upcoming(self, ctx: Context) -> list[Item]:
        names = {**self.state.provisional_titles, **self.state.short_titles} if self.config.short_names else {}
        every = (self.saved(source).items for source in self.config.sources)
        return upcoming(every, self.today(ctx), names, self.config.max_items)

    # Short titles from the ai_analyzer ---------------------------------------------------------------------------

    def ask_for_short_titles(self, ctx: Context) -> None:
        if not self.config.short_names:
            return
        now = ctx.now()
        self.asked = {id_: a for id_, a in self.asked.items() if now - a.at < AI_REQUEST_PATIENCE_SECONDS}
        pending = {title for asked in self.asked.values() for title in asked.titles}
        titles = sorted({item.title for item in self.upcoming(ctx)} - self.state.short_titles.keys() - pending)
        if not titles:
            return
        id_ = f"{ctx.name}-{uuid.uuid4().hex[:12]}"
        request = AiRequest(id=id_, task="shorten", items=titles, reply_to=self.topics.ai_reply)
        self.asked[request.id] = AskedTitles(titles=titles, at=now)
        ctx.publish(self.topics.ai_request, _encoder.encode(request), qos=1, local_only=True)

    def merge_short_titles(self, ctx: Context, reply: AiReply) -> None:
        asked = self.asked.pop(reply.id, None)
        if asked is None:
            ctx.log.debug("ignored an AI reply to a request this run did not make: %s", reply.id)
            return
        if len(reply.results) != len(asked.titles):
            ctx.log.warning(
                "ignored AI reply %s: expected %d results, got %d", reply.id, len(asked.titles), len(reply.results)
            )
            return
        names = self.state.provisional_titles if reply.fallback else self.state.short_titles
        names.update(
            (title, short.strip()) for title, short in zip(asked.titles, reply.results, strict=True) if short.strip()
        )
        if self.publish(ctx):
            save_state(ctx.state_dir / STATE_FILE, self.state)

    def forget_old_short_titles(self) -> None:
        titles = {item.title for saved in self.state.sources.values() for item in saved.items}
        for names in (self.state.short_titles, self.state.provisional_titles):
            for title in names.keys() - titles:
                del names[title]

    # State ---------------------------------------------------------------------------------------------------------

    def source(self, name: str) -> Source:
        return next(source for source in self.config.sources if source.name == name)

    def saved(self, source: Source) -> SourceState:
        """What is kept of `source`; starts afresh when its config changed since."""
        fingerprint = hashlib.sha256(_encoder.encode(source)).hexdigest()[:16]
        saved = self.state.sources.get(source.name)
        if saved is None or saved.fingerprint != fingerprint:
            saved = self.state.sources[source.name] = SourceState(fingerprint=fingerprint)
        return saved

    def today(self, ctx: Context) -> date:
        return datetime.fromtimestamp(ctx.now(), self.zone).date()


# Pure logic --------------------------------------------------------------------------------------------------------


def upcoming(per_source: Iterable[list[Item]], today: date, short_titles: dict[str, str], max_items: int) -> list[Item]:
    """Items from `today` on, without duplicates, in date and time order, at most `max_items`, with short titles."""
    found: dict[tuple[str, str, str], Item] = {}
    for items in per_source:
        for item in items:
            if item.date >= today.isoformat():
                found.setdefault((item.date, item.time or "", item.title), item)
    ordered = [found[key] for key in sorted(found)][:max_items]
    return [msgspec.structs.replace(item, short_title=short_titles.get(item.title)) for item in ordered]


def next_delay(interval: float, jitter: float, uniform: Callable[[], float] = random.random) -> float:
    """Seconds until the next scheduled run: the interval plus a random part of `jitter`, never less."""
    return interval + jitter * uniform()


def list_hash(topic: str, payload: bytes) -> str:
    return hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()


def entities(topics: Topics, refresh_topic: str) -> list[Entity]:
    return [
        Sensor(
            object_id="events_count",
            name="Events",
            state_topic=topics.events,
            value_template="{{ value_json.count }}",
            state_class="measurement",
            icon="mdi:calendar-multiple",
        ),
        Sensor(
            object_id="next_event",
            name="Next event",
            state_topic=topics.next,
            value_template="{{ value_json.get('short_title') or value_json.get('title') or None }}",  # None: unknown
            json_attributes_topic=topics.next,
            icon="mdi:calendar-star",
        ),
        Sensor(
            object_id="last_run",
            name="Last run",
            state_topic=topics.last_run,
            value_template="{{ value_json.time }}",
            device_class="timestamp",
            json_attributes_topic=topics.last_run,
            entity_category="diagnostic",
            icon="mdi:clock-check-outline",
        ),
        Button(object_id="refresh", name="Refresh", command_topic=refresh_topic, icon="mdi:refresh"),
    ]


def load_state(path: Path, ctx: Context) -> SavedState:
    try:
        return _state_decoder.decode(path.read_bytes())
    except FileNotFoundError:
        return SavedState()
    except (OSError, msgspec.DecodeError) as exc:
        ctx.log.warning("cannot read %s (%s); starting afresh", path, exc)
        return SavedState()


def save_state(path: Path, state: SavedState) -> None:
    """Write `state` to `path` atomically (a new file renamed over the old one)."""
    write_atomically(path, _encoder.encode(state))


def _iso(timestamp: float, zone: ZoneInfo) -> str:
    return datetime.fromtimestamp(timestamp, zone).isoformat(timespec="seconds")
