"""ai_analyzer: short human text from a language model, never blocking on it.

Consumes: `AiRequest` JSON on `<base>/ai/request` (see `contracts.ai`): a task (a prompt template from config;
`shorten` for event titles and `phrase` for automation suggestions are built in) and the items to turn into text.
Produces: one `AiReply` per request on its `reply_to` topic (QoS 1), with the same id, always within
`reply_deadline_seconds`: from the model, from the cache, or from deterministic rules (`fallback=True`) when the
model fails, is too slow or is disabled. A reply to a topic under `<base>/` stays local (another worker asked); a
reply to any other topic also goes to the broker (a script or Node-RED asked over MQTT). Retained sensors under
`<base>/<worker>/`: cache entries, cache hits, cache misses, last latency (ms); a `clear_cache` button.
Touches outside: an OpenAI-compatible chat-completions API over HTTP (OpenAI, Ollama, llama.cpp server, LocalAI),
with the API key from an environment variable; a SQLite cache in its state directory.

Errors: a model that fails (HTTP error, network, timeout, a malformed answer, no answer within the deadline) counts
one `ai` error per request it leaves to the fallback rules; a request with an unknown task or an unusable reply
topic counts a `decode` error, as an undecodable payload does: the fault is the requester's, not the model's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sqlite3
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from contracts import Command, Context, Message, Subscription, Timer, Worker
from contracts.ai import AiReply, AiRequest, request_topic
from contracts.homeassistant import Button, Sensor
from workers._chat import ChatClient, Endpoint, ModelError, RateLimit

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]

# Config --------------------------------------------------------------------------------------------------------------


class TaskConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A `[workers.ai_analyzer.tasks.<task>]` table. For a built-in task, the keys given replace the built-in's."""

    system: str | None = None  # what the model is told: its role and the answer format (one line per item)
    user: str | None = None  # what it is asked: `{items}` becomes the numbered items, `{count}` their number
    fallback: Literal["abbreviate", "template"] | None = None  # the rule used when the model does not answer
    fallback_template: str | None = None  # for "template": `{item}` becomes the item
    fallback_max_chars: Annotated[int, msgspec.Meta(ge=8)] | None = None  # for "abbreviate": longer is cut


@dataclass(frozen=True)
class Task:
    """A task with every field resolved."""

    system: str
    user: str = "{items}"
    fallback: Literal["abbreviate", "template"] = "template"
    fallback_template: str = "{item}"
    fallback_max_chars: int = 32


_ONE_LINE_EACH = (
    "Answer with exactly one line per item, in the order given, without numbering, quotes or any other text."
)
BUILTIN_TASKS = {
    "shorten": Task(
        system=(
            "You shorten event titles for a small display. Give each title as a short name of at most 30 "
            "characters: keep the names that matter (teams, artists, the event), drop competitions, rounds, venues "
            "and dates, abbreviate common words (United: Utd). " + _ONE_LINE_EACH
        ),
        user="Shorten these {count} titles:\n{items}",
        fallback="abbreviate",
    ),
    "phrase": Task(
        system=(
            "You phrase automation suggestions for a smart home as one short, friendly sentence each, addressed "
            "to the people who live there, with plain names instead of technical identifiers. " + _ONE_LINE_EACH
        ),
        user="Phrase these {count} suggestions:\n{items}",
        fallback="template",
        fallback_template="Suggested automation: {item}.",
    ),
}


def resolve_tasks(configured: dict[str, TaskConfig]) -> dict[str, Task]:
    """The built-in tasks with the configured ones laid over them; raises ValueError for an unusable task."""
    tasks = dict(BUILTIN_TASKS)
    for name, given in configured.items():
        base = BUILTIN_TASKS.get(name)
        if base is None and given.system is None:
            raise ValueError(f"tasks.{name}: a new task needs `system` (the instructions for the model)")
        values = {k: v for k, v in msgspec.structs.asdict(given).items() if v is not None}
        task = Task(**({} if base is None else dataclasses.asdict(base)) | values)
        if "{items}" not in task.user:
            raise ValueError(f"tasks.{name}.user: expected a template containing {{items}}, got {task.user!r}")
        tasks[name] = task
    return tasks


class AiAnalyzerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `[workers.ai_analyzer]` section: the model and how to reach it, limits, the deadline, the cache, tasks."""

    # false: never call the model; every request gets the fallback rules at once (no error is counted).
    ai_enabled: bool = True
    # The API root: requests go to {base_url}/chat/completions.
    base_url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^/\s]+")] = "http://127.0.0.1:11434/v1"
    model: str = "llama3.2"
    api_key_env: str | None = None  # the environment variable holding the API key; unset: no Authorization header
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 0.2
    max_tokens: Count | None = None  # sent only when set
    timeout_seconds: Seconds = 20.0  # per HTTP attempt; a timeout is not retried
    retries: Annotated[int, msgspec.Meta(ge=0)] = 2  # further attempts after a 429, a 5xx or a network error
    retry_backoff_seconds: Seconds = 1.0  # doubles per retry; a 429's Retry-After takes precedence
    max_retry_wait_seconds: Seconds = 30.0  # the longest wait between attempts (caps Retry-After too)
    max_concurrent_requests: Annotated[int, msgspec.Meta(ge=1, le=4)] = 2  # at once (4 threads); more queue
    max_queued_requests: Count = 100  # a request beyond these gets the fallback at once (an `ai` error)
    requests_per_minute: Annotated[int, msgspec.Meta(ge=0)] = 60  # 0: no limit
    reply_deadline_seconds: Seconds = 15.0  # no reply later than this after the request
    probe_interval_seconds: Seconds = 60.0  # while the model is unreachable, ask again this often
    cache_max_entries: Count = 10000  # least recently used entries are evicted beyond this
    tasks: dict[str, TaskConfig] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        resolve_tasks(self.tasks)


# Fallback rules: deterministic, no model -----------------------------------------------------------------------------

_ABBREVIATIONS = {
    "Football Club": "FC",
    "United": "Utd",
    "Athletic": "Ath.",
    "Saint": "St.",
    "Sankt": "St.",
    "International": "Intl.",
    "University": "Univ.",
    "Orchestra": "Orch.",
    "Philharmonic": "Phil.",
    "Symphony": "Sym.",
    "Championship": "Champ.",
}
_ABBREVIATION = re.compile(r"\b(" + "|".join(map(re.escape, _ABBREVIATIONS)) + r")\b")
_DASH = "\N{EN DASH}"
_SEGMENT = re.compile(r"\s+[\u2013\u2014|\u00b7-]\s+")  # "A vs. B - Competition" (any dash) or "Show | Venue"
_VERSUS = re.compile(r"\s+(?:vs?\.?|versus|gegen)\s+", re.IGNORECASE)
_DETAIL = re.compile(r"\s*(?:\(.*?\)|\[.*?\]|,.*)$")  # a trailing "(...)", "[...]" or ", ..."


def abbreviate_title(title: str, max_chars: int = 32) -> str:
    """A short name for an event title: "FC Example vs. Sample United - Bundesliga, Matchday 12" becomes "FC Example
    - Sample Utd" (with en dashes). Keeps the part naming the event, drops details, abbreviates common words, and
    cuts what is still longer than `max_chars` at a word."""
    segments = _SEGMENT.split(" ".join(title.split()))
    main = next((s for s in segments if _VERSUS.search(s)), segments[0])
    sides = [_DETAIL.sub("", side).strip() for side in _VERSUS.split(main, maxsplit=1)]
    short = f" {_DASH} ".join(_ABBREVIATION.sub(lambda m: _ABBREVIATIONS[m.group(1)], side) for side in sides if side)
    if len(short) <= max_chars:
        return short or title.strip()
    cut = short[: max_chars - 1].rsplit(" ", 1)[0].rstrip(f" ,{_DASH}")
    return f"{cut}…"


def fallback_text(task: Task, item: str) -> str:
    """What `task`'s rule makes of `item` when the model does not answer."""
    item = " ".join(item.split())
    if task.fallback == "abbreviate":
        return abbreviate_title(item, task.fallback_max_chars)
    if "{item}." in task.fallback_template:
        item = item.rstrip(".")
    return task.fallback_template.replace("{item}", item)


# The cache -----------------------------------------------------------------------------------------------------------


class Cache:
    """Model answers on disk (SQLite) by key; beyond `max_entries` the least recently used go first.

    Used from the worker's loop only (SQLite connections stay on the thread that made them). A file that is not a
    readable database is moved aside (`.corrupt`) and a new one started: it only held answers the model can give
    again.
    """

    def __init__(self, path: Path, max_entries: int) -> None:
        self.path = path
        self.max_entries = max_entries
        try:
            self._db = self._open()
        except sqlite3.DatabaseError:
            path.replace(path.with_suffix(".corrupt"))
            self._db = self._open()
        self._tick = self._db.execute("SELECT coalesce(max(used), 0) FROM answers").fetchone()[0]

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT NOT NULL, used INTEGER)")
            db.execute("CREATE INDEX IF NOT EXISTS answers_used ON answers (used)")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM answers").fetchone()[0])

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT text FROM answers WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        self._db.execute("UPDATE answers SET used = ? WHERE key = ?", (self._next_tick(), key))
        return str(row[0])

    def put(self, key: str, text: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)", (key, text, self._next_tick()))
        self._db.execute(
            "DELETE FROM answers WHERE key IN (SELECT key FROM answers ORDER BY used DESC LIMIT -1 OFFSET ?)",
            (self.max_entries,),
        )

    def clear(self) -> int:
        """Forget every answer; returns how many there were."""
        return int(self._db.execute("DELETE FROM answers").rowcount)

    def close(self) -> None:
        self._db.close()

    def _next_tick(self) -> int:
        self._tick += 1
        return int(self._tick)


def cache_key(model: str, task: Task, item: str) -> str:
    """The model and everything in the prompt that shapes this item's answer, hashed."""
    prompt_parts = json.dumps([model, task.system, task.user, " ".join(item.split())])
    return hashlib.sha256(prompt_parts.encode()).hexdigest()


# The worker ----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Pending:
    """A request not answered yet: results known so far (from the cache), and its deadline."""

    request: AiRequest
    task: Task
    keys: list[str]
    results: list[str | None]
    deadline: Timer | None = None
    replied: bool = False


@dataclass(frozen=True)
class _Call:
    """One call to the model for the items of `pending` that the cache did not have."""

    pending: _Pending
    indexes: list[int]


@dataclass(frozen=True)
class _Answer:
    results: list[str]
    seconds: float


@dataclass
class _Sensors:
    cache_hits: int = 0
    cache_misses: int = 0
    latency_ms: int | None = None
    published: dict[str, str] = field(default_factory=dict)


_reply_encoder = msgspec.json.Encoder()


class AiAnalyzer(Worker[AiAnalyzerConfig]):
    """Answers `AiRequest`s on `<base>/ai/request` with `AiReply`s, from a language model, its cache or rules; see
    the module docstring for what it consumes, produces and touches."""

    name = "ai_analyzer"
    title = "AI analyzer"
    example_config: ClassVar[dict[str, Any]] = {"ai_enabled": False}  # the rules answer
    error_kinds = ("ai",)
    memory_limit_mb = 128  # resident MiB; a section's memory_limit_mb overrides it
    Config = AiAnalyzerConfig

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(request_topic(self.site.base_topic), qos=1, handler=self._request, type=AiRequest)]

    def example_message(self) -> tuple[str, bytes]:
        base = self.site.base_topic
        request = AiRequest(id="example", task="shorten", items=["Riverside FC - Harbour City"], reply_to=f"{base}/x")
        return request_topic(base), msgspec.json.encode(request)

    def on_start(self, ctx: Context) -> None:
        config = self.config
        self.tasks = resolve_tasks(config.tasks)
        self.base_topic = ctx.site.base_topic
        self.client = ChatClient(self._endpoint(ctx), RateLimit(config.requests_per_minute))
        self.cache = Cache(ctx.state_dir / "cache.sqlite3", config.cache_max_entries)
        self.queue: deque[_Call] = deque()
        self.running = 0
        self.pending: set[_Pending] = set()
        self.sensors = _Sensors()
        ctx.report_status(ai_enabled=config.ai_enabled, ai_model=config.model)
        ctx.declare(self._entities(ctx))
        self._publish_sensors(ctx)
        ctx.log.info("model %s at %s (%s)", config.model, config.base_url, "on" if config.ai_enabled else "off")
        self.model_down: str | None = None  # why the model is known to be unreachable; None while it is not
        self._probing = False
        if config.ai_enabled:
            self._probe(ctx)

    # Whether the model is there ----------------------------------------------------------------------------------

    def _probe(self, ctx: Context) -> None:
        """Ask, off the loop, whether the model's server answers at all (once at start, then while it does not)."""
        if not self._probing:
            self._probing = True
            ctx.run_in_thread(self.client.probe, partial(self._probed, ctx))

    def _probed(self, ctx: Context, done: Future[str | None]) -> None:
        self._probing = False
        problem, was = done.result(), self.model_down
        self.model_down = problem
        config = self.config
        if problem is not None:
            if was is None:
                ctx.log.info(
                    "the model %s at %s is not reachable (%s): rules answer until it is (asking again every %g s)",
                    config.model,
                    config.base_url,
                    problem,
                    config.probe_interval_seconds,
                )
            ctx.call_later(config.probe_interval_seconds, lambda: self._probe(ctx))
        elif was is not None:
            ctx.log.info("the model %s at %s is reachable again", config.model, config.base_url)

    def _model_unreachable(self, ctx: Context, problem: str) -> None:
        """A request found the model's server gone: answer the next ones with rules at once, and probe."""
        if self.model_down is None:
            self.model_down = problem
            ctx.call_later(self.config.probe_interval_seconds, lambda: self._probe(ctx))

    def _endpoint(self, ctx: Context) -> Endpoint:
        config = self.config
        api_key = None
        if config.api_key_env is not None:
            api_key = os.environ.get(config.api_key_env)
            if not api_key:
                ctx.report_error(
                    "ai",
                    f"[workers.{ctx.name}] api_key_env: the environment variable {config.api_key_env} is not set "
                    "or empty; asking without a key (set it, or remove api_key_env for a server without keys)",
                )
        return Endpoint(
            base_url=config.base_url,
            model=config.model,
            api_key=api_key,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            timeout_seconds=config.timeout_seconds,
            retries=config.retries,
            retry_backoff_seconds=config.retry_backoff_seconds,
            max_retry_wait_seconds=config.max_retry_wait_seconds,
        )

    def _request(self, ctx: Context, request: AiRequest, message: Message) -> None:
        if not request.reply_to or any(c in request.reply_to for c in "+#\0"):
            ctx.report_error(
                "decode",
                f"request {request.id!r} on {message.topic}: reply_to {request.reply_to!r} "
                "is not a topic to publish to (empty, or with wildcards); dropped",
            )
            return
        task = self.tasks.get(request.task)
        if task is None:
            known = ", ".join(sorted(self.tasks))
            error = f"unknown task {request.task!r}; expected one of: {known}"
            ctx.report_error("decode", f"request {request.id!r} on {message.topic}: {error}")
            self._send(
                ctx,
                AiReply(id=request.id, task=request.task, results=request.items, fallback=True, error=error),
                request.reply_to,
            )
            return
        keys = [cache_key(self.config.model, task, item) for item in request.items]
        pending = _Pending(request, task, keys, [None] * len(keys))
        if not self.config.ai_enabled:
            self._answer_with_rules(ctx, pending, "the model is disabled (ai_enabled = false)", count_error=False)
            return
        self._answer(ctx, pending)

    def _answer(self, ctx: Context, pending: _Pending) -> None:
        """Reply from the cache if it has every item; otherwise queue a call to the model for the rest."""
        pending.results = [self.cache.get(key) for key in pending.keys]
        missing = [i for i, result in enumerate(pending.results) if result is None]
        self.sensors.cache_misses += len(missing)
        self.sensors.cache_hits += len(pending.keys) - len(missing)
        self._publish_sensors(ctx)
        if not missing:
            self._reply(ctx, pending, cached=bool(pending.keys))
        elif self.model_down is not None:  # no waiting, no retries: said once when it went, in the log
            why = f"the model is not reachable ({self.model_down})"
            self._answer_with_rules(ctx, pending, why, count_error=False, failed=True)
        elif len(self.queue) >= self.config.max_queued_requests:
            self._answer_with_rules(ctx, pending, f"{len(self.queue)} requests already wait for the model")
        else:
            deadline = self.config.reply_deadline_seconds
            pending.deadline = ctx.call_later(
                deadline, lambda: self._answer_with_rules(ctx, pending, f"no answer from the model within {deadline} s")
            )
            self.pending.add(pending)
            self.queue.append(_Call(pending, missing))
            self._dispatch(ctx)

    def _dispatch(self, ctx: Context) -> None:
        """Start queued calls while fewer than `max_concurrent_requests` are running."""
        while self.queue and self.running < self.config.max_concurrent_requests:
            call = self.queue.popleft()
            items = [call.pending.request.items[i] for i in call.indexes]
            self.running += 1
            ctx.run_in_thread(partial(self._ask, call.pending.task, items), partial(self._answered, ctx, call))

    def _ask(self, task: Task, items: list[str]) -> _Answer:
        """On a background thread: the model's results for `items`; raises ModelError."""
        started = time.monotonic()
        results = self.client.results(task.system, task.user, items)
        return _Answer(results, time.monotonic() - started)

    def _answered(self, ctx: Context, call: _Call, future: Future[_Answer]) -> None:
        """On the loop: cache what the model said and reply, unless the deadline came first."""
        self.running -= 1
        self._dispatch(ctx)
        pending = call.pending
        try:
            answer = future.result()
        except ModelError as exc:
            if exc.reason == "network":
                self._model_unreachable(ctx, exc.detail)
            self._answer_with_rules(ctx, pending, f"{exc.reason}: {exc.detail}")
            return
        for index, text in zip(call.indexes, answer.results, strict=True):
            self.cache.put(pending.keys[index], text)
            pending.results[index] = text
        self.sensors.latency_ms = round(answer.seconds * 1000)
        self._publish_sensors(ctx)
        if pending.replied:
            ctx.log.info("late answer for request %r cached (%d items)", pending.request.id, len(answer.results))
        else:
            self._reply(ctx, pending, cached=False)

    def _answer_with_rules(
        self, ctx: Context, pending: _Pending, why: str, *, count_error: bool = True, failed: bool | None = None
    ) -> None:
        """Reply with the fallback rules for every item the cache and the model did not give (once per request)."""
        if pending.replied:
            ctx.log.info("request %r was answered already; %s", pending.request.id, why)
            return
        request = pending.request
        if count_error:
            ctx.report_error(
                "ai",
                f"request {request.id!r} ({request.task}, {len(request.items)} items): {why}; "
                "answered by the fallback rules",
            )
        for index, result in enumerate(pending.results):
            if result is None:
                pending.results[index] = fallback_text(pending.task, request.items[index])
        failed = count_error if failed is None else failed
        self._reply(ctx, pending, cached=False, fallback=True, error=why, failed=failed)

    def _reply(
        self,
        ctx: Context,
        pending: _Pending,
        *,
        cached: bool,
        fallback: bool = False,
        error: str | None = None,
        failed: bool = False,
    ) -> None:
        """Reply to a request; `failed`: the model let it down (each request is one run for the status)."""
        pending.replied = True
        ctx.report_status(last_run_ok=not failed)
        self.pending.discard(pending)
        if pending.deadline is not None:
            pending.deadline.cancel()
        request = pending.request
        results = [r or "" for r in pending.results]
        model = None if fallback else self.config.model
        reply = AiReply(
            id=request.id,
            task=request.task,
            results=results,
            fallback=fallback,
            cached=cached,
            model=model,
            error=error,
        )
        self._send(ctx, reply, request.reply_to)

    def _send(self, ctx: Context, reply: AiReply, topic: str) -> None:
        local = topic.startswith(f"{self.base_topic}/")
        ctx.publish(topic, _reply_encoder.encode(reply), qos=1, local_only=local)

    def on_command(self, ctx: Context, command: Command) -> None:
        if command.name != "clear_cache":
            super().on_command(ctx, command)
            return
        removed = self.cache.clear()
        ctx.log.info("cache cleared (%d entries)", removed)
        self._publish_sensors(ctx)

    def on_stop(self, ctx: Context) -> None:
        self.client.stop()
        for pending in list(self.pending):
            self._answer_with_rules(
                ctx, pending, "the ai_analyzer stopped before the model answered", count_error=False
            )
        self.cache.close()

    # Home Assistant -------------------------------------------------------------------------------------------------

    def _sensor_topic(self, ctx: Context, sensor: str) -> str:
        return ctx.site.worker_own_topic(ctx.name, sensor)

    def _entities(self, ctx: Context) -> list[Sensor | Button]:
        def sensor(object_id: str, name: str, **keys: Any) -> Sensor:
            topic = self._sensor_topic(ctx, object_id)
            return Sensor(object_id=object_id, name=name, state_topic=topic, entity_category="diagnostic", **keys)

        return [
            sensor("cache_entries", "AI cache entries", state_class="measurement", icon="mdi:database"),
            sensor("cache_hits", "AI cache hits", state_class="total_increasing", icon="mdi:database-check"),
            sensor("cache_misses", "AI cache misses", state_class="total_increasing", icon="mdi:database-off"),
            sensor(
                "latency_ms",
                "Last model latency",
                state_class="measurement",
                unit_of_measurement="ms",
                device_class="duration",
                icon="mdi:timer-outline",
            ),
            Button(
                object_id="clear_cache",
                name="Clear AI cache",
                command_topic=ctx.command_topic("clear_cache"),
                entity_category="config",
                icon="mdi:delete-sweep",
            ),
        ]

    def _publish_sensors(self, ctx: Context) -> None:
        """Publish (retained) each sensor whose value changed since it was last published."""
        values = {
            "cache_entries": str(len(self.cache)),
            "cache_hits": str(self.sensors.cache_hits),
            "cache_misses": str(self.sensors.cache_misses),
        }
        if self.sensors.latency_ms is not None:
            values["latency_ms"] = str(self.sensors.latency_ms)
        for sensor, value in values.items():
            if self.sensors.published.get(sensor) != value:
                ctx.publish(self._sensor_topic(ctx, sensor), value, qos=1, retain=True)
                self.sensors.published[sensor] = value
