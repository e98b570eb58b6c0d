"""batch_scheduler: scheduled batch jobs with catch-up, and the daily analysis that suggests automations.

Consumes: state changes on `record_topics` (e.g. Home Assistant's statestream, `<domain>/<object_id>/state`, or the
home's own `<prefix>/<type>/<id>/state`; plain text, or JSON with a `state` key), the `run_analysis` button
(`<base>/cmd/<worker>/run_analysis`), and ai_analyzer's `AiReply`s on `<base>/<worker>/ai_reply` when `use_ai`.
Produces: each automation suggestion as JSON on `ha-ai/events/suggestion/generated` (QoS 1, message expiry 30 s),
a summary on `ha-ai/status/analysis_complete` (`patterns_detected`, `suggestions_generated`, `duration_seconds`),
`AiRequest`s (local-only) when `use_ai`, and retained sensors under `<base>/<worker>/`: last run, next run, last
duration, suggestions in the last run (with the suggestions as attributes); a `Run analysis now` button.
Touches: its state directory: `history.sqlite3` (the recorded changes, kept `retention_days`) and `jobs.json` (the
last run of each job, so a run missed while the host was down is caught up once at start).

Jobs (`[workers.<name>.jobs.<job>]`) run a task, `analysis` or `retention`, on a cron expression or an interval, in
a time zone, with jitter. A job never overlaps itself: triggers during a run (schedule, command) make one re-run
after it. Failure policy: an exception in a job is counted (as an error of the job's task) and the job goes on
with its schedule; a change that cannot be written is counted as `recording`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import sqlite3
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from contracts import Command, Context, Message, Subscription, Timer, Trigger, Worker
from contracts.ai import AiReply, AiRequest, request_topic
from contracts.decoding import BoundedJson
from contracts.homeassistant import Button, Entity, Sensor
from contracts.state import write_atomically
from workers._cron import Cron, CronSchedule, IntervalSchedule, Schedule, missed_run
from workers._history import Recorder, delete_before, read_changes
from workers._patterns import AnalysisSettings, Suggestion, analysis_window, find_patterns, suggest

SUGGESTION_EXPIRY_SECONDS = 30
_WAKE_AT_LEAST_EVERY = 60.0  # re-read the clock this often while waiting for a job: it may have been stepped
_ACTIONABLE = ["light", "switch", "cover", "fan", "climate", "lock", "media_player", "input_boolean", "scene"]
_IGNORED_STATES = {"", "unknown", "unavailable", "none", "null"}

# Config -------------------------------------------------------------------------------------------------------------


def zone_named(name: str) -> ZoneInfo:
    """The IANA time zone `name`, or the host's own for ""; raises ValueError for an unknown name."""
    if not name:
        return _host_zone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f'time_zone "{name}": not an IANA time zone name such as "Europe/Berlin" or "UTC"') from None


def _host_zone() -> ZoneInfo:
    with contextlib.suppress(ZoneInfoNotFoundError, ValueError, OSError):
        if os.environ.get("TZ"):
            return ZoneInfo(os.environ["TZ"].lstrip(":"))
        target = Path("/etc/localtime").resolve()
        if "zoneinfo/" in str(target):
            return ZoneInfo(str(target).split("zoneinfo/", 1)[1])
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    return ZoneInfo("UTC")


class JobConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One `[workers.<name>.jobs.<job>]` table: a task on a cron expression or an interval."""

    task: Literal["analysis", "retention"] = "analysis"
    cron: str | None = None  # minute hour day-of-month month day-of-week, e.g. "30 3 * * *"
    interval_seconds: Annotated[float, msgspec.Meta(ge=1)] | None = None
    time_zone: str | None = None  # for `cron`; None: the worker's `time_zone`
    jitter_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # a random delay up to this, per scheduled run
    catch_up: bool = True  # run once at start if a run was missed while the worker was down

    def check(self) -> None:
        """Raise ValueError for a job that cannot run (checked by the worker's config, which names the job)."""
        if (self.cron is None) == (self.interval_seconds is None):
            raise ValueError("expected exactly one of `cron` and `interval_seconds`")
        if self.cron is not None:
            Cron.parse(self.cron)
        if self.time_zone is not None:
            zone_named(self.time_zone)


def _default_jobs() -> dict[str, JobConfig]:
    return {
        "analysis": JobConfig(task="analysis", cron="30 3 * * *"),
        "retention": JobConfig(task="retention", cron="15 3 * * *"),
    }


class BatchSchedulerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    record_topics: list[str] = msgspec.field(default_factory=lambda: ["homeassistant/statestream/+/+/state"])
    retention_days: Annotated[int, msgspec.Meta(ge=1)] = 30
    time_zone: str = ""  # "": the host's
    jobs: dict[str, JobConfig] = msgspec.field(default_factory=_default_jobs)
    analysis: AnalysisSettings = msgspec.field(default_factory=AnalysisSettings)
    suggestion_domains: list[str] = msgspec.field(default_factory=lambda: list(_ACTIONABLE))
    max_suggestions: Annotated[int, msgspec.Meta(ge=0)] = 10
    use_ai: bool = False
    ai_timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = 20.0
    suggestion_topic: str = "ha-ai/events/suggestion/generated"
    summary_topic: str = "ha-ai/status/analysis_complete"

    def __post_init__(self) -> None:
        zone_named(self.time_zone)
        for name, job in self.jobs.items():
            try:
                job.check()
            except ValueError as exc:
                raise ValueError(f"jobs.{name}: {exc}") from None


# Job state and incoming states --------------------------------------------------------------------------------------


class JobState(msgspec.Struct, kw_only=True):
    """What `jobs.json` keeps per job."""

    first_seen_ts: float  # when the job was first configured: the reference for catch-up before its first run
    last_run_ts: float | None = None  # the start of the last finished run
    last_trigger: Trigger | None = None
    last_duration_seconds: float | None = None
    last_suggestions: int | None = None


def entity_of(topic: str) -> str:
    """`home/light/hall/state` and `homeassistant/statestream/light/hall/state` -> `light.hall`."""
    levels = topic.split("/")
    if levels[-1] == "state" and len(levels) > 2:
        levels = levels[:-1]
    return ".".join(levels[-2:])


_any_decoder: BoundedJson[Any] = BoundedJson()


def state_of(payload: bytes) -> str | None:
    """The state in a payload (text, or JSON with a `state`), lower-cased; None for a reading or no state."""
    text = payload.decode(errors="replace").strip()
    if text.startswith("{"):
        try:
            value = _any_decoder.decode(text.encode()).get("state")
        except (msgspec.DecodeError, AttributeError):
            return None
        text = value.strip() if isinstance(value, str) else ""
    text = text.strip('"').lower()
    if text in _IGNORED_STATES or len(text) > 64:
        return None
    try:
        float(text)
    except ValueError:
        return text
    return None  # a number is a measurement, not a state


# Analysis results ---------------------------------------------------------------------------------------------------


@dataclass
class Analysis:
    """What the background part of an analysis run found."""

    patterns: int
    suggestions: list[Suggestion]


def analyse(path: Path, now: float, zone: ZoneInfo, config: BatchSchedulerConfig) -> Analysis:
    """The whole analysis, off the loop: read the window's history, find patterns, make suggestions."""
    start, end = analysis_window(now, zone, config.analysis.window_days)
    patterns = find_patterns(read_changes(path, start, end), start, end, zone, config.analysis)
    return Analysis(len(patterns), suggest(patterns, config.suggestion_domains, config.max_suggestions))


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    patterns_detected: int
    suggestions_generated: int
    duration_seconds: float
    job: str
    trigger: str
    started_ts: float
    phrased_by: str  # ai | template


@dataclass
class Job:
    """A configured job and where it stands."""

    name: str
    config: JobConfig
    schedule: Schedule
    state: JobState
    due: float = 0.0
    timer: Timer | None = None
    running: Trigger | None = None  # the trigger of the run under way
    started: float = 0.0
    rerun: Trigger | None = None  # a trigger that came during the run: one more run after it
    failed: bool = False  # the run under way raised
    waiting: AiRequest | None = None  # an analysis waiting for ai_analyzer's phrasing
    analysis: Analysis | None = None
    ai_timer: Timer | None = None


# The worker ---------------------------------------------------------------------------------------------------------


class BatchScheduler(Worker[BatchSchedulerConfig]):
    """Runs batch jobs on schedules with catch-up; records state changes and suggests automations from them. See
    the module docstring for what it consumes, produces and touches."""

    name = "batch_scheduler"
    title = "Batch analysis"
    example_config: ClassVar[dict[str, Any]] = {"record_topics": ["home/+/+/state"], "use_ai": False}
    error_kinds = ("analysis", "retention", "recording", "state")
    memory_limit_mb = 256  # resident MiB; a section's memory_limit_mb overrides it
    Config = BatchSchedulerConfig

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(topic, qos=1, handler=self._record) for topic in self.config.record_topics]

    def example_message(self) -> tuple[str, bytes]:
        return "home/light/kitchen/state", b"on"

    def on_start(self, ctx: Context) -> None:
        config = self.config
        self.zone = zone_named(config.time_zone)
        self.topic = ctx.site.worker_own_topic(ctx.name)
        self.reply_topic = f"{self.topic}/ai_reply"
        self.recorder = Recorder(ctx.state_dir / "history.sqlite3")
        self.state_path = ctx.state_dir / "jobs.json"
        self.requests = 0
        now = ctx.now()
        states = self._load_states(ctx)
        self.jobs = {
            name: Job(name, job, self._schedule(job), states.get(name) or JobState(first_seen_ts=now))
            for name, job in config.jobs.items()
        }
        self._save_states(ctx)
        if config.use_ai:
            ctx.subscribe(Subscription(self.reply_topic, qos=1, handler=self._ai_reply, type=AiReply))
        ctx.declare(self._entities(ctx))
        self._report_last_run(ctx)
        for job in self.jobs.values():
            reference = job.state.last_run_ts or job.state.first_seen_ts
            if job.config.catch_up and missed_run(job.schedule, reference, now):
                ctx.log.info("job %s missed a run while down (last run %s); catching up", job.name, _iso(reference))
                self._trigger(ctx, job, "catch_up")
            else:
                self._arm(ctx, job)
        self._publish_next_run(ctx)

    def _ai_reply(self, ctx: Context, reply: AiReply, message: Message) -> None:
        job = next((j for j in self.jobs.values() if j.waiting is not None and j.waiting.id == reply.id), None)
        if job is None:
            ctx.log.info("ignored an AI reply %r that no analysis waits for", reply.id)
        else:
            self._step(ctx, job, partial(self._phrased, ctx, job, reply))

    def _record(self, ctx: Context, payload: bytes, message: Message) -> None:
        """A state change of the home, on one of `record_topics`."""
        state = state_of(payload)
        if state is None:
            return
        entity = entity_of(message.topic)
        if message.retain:  # the state it is in, not a change happening now
            self.recorder.last_state[entity] = state
            return
        try:
            self.recorder.record(ctx.now(), entity, state)
        except sqlite3.Error as exc:
            ctx.report_error("recording", f"cannot record {entity} = {state!r} from {message.topic}: {exc}")

    def on_command(self, ctx: Context, command: Command) -> None:
        match command.name:
            case "run_analysis":
                for job in self.jobs.values():
                    if job.config.task == "analysis":
                        self._trigger(ctx, job, "command")
            case _:
                super().on_command(ctx, command)

    def on_stop(self, ctx: Context) -> None:
        for job in self.jobs.values():
            for timer in (job.timer, job.ai_timer):
                if timer is not None:
                    timer.cancel()
        self.recorder.close()

    # Scheduling ----------------------------------------------------------------------------------------------------

    def _schedule(self, job: JobConfig) -> Schedule:
        if job.cron is not None:
            return CronSchedule(Cron.parse(job.cron), zone_named(job.time_zone) if job.time_zone else self.zone)
        assert job.interval_seconds is not None  # checked by JobConfig
        return IntervalSchedule(job.interval_seconds)

    def _arm(self, ctx: Context, job: Job) -> None:
        """Set the job's next due time from its last run (or now, for a run it skipped) and wait for it."""
        now = ctx.now()
        due = job.schedule.next_after(job.state.last_run_ts or job.state.first_seen_ts)
        if due <= now:
            due = job.schedule.next_after(now)
        job.due = due + random.uniform(0, job.config.jitter_seconds)
        self._wait(ctx, job)

    def _wait(self, ctx: Context, job: Job) -> None:
        delay = min(max(job.due - ctx.now(), 0.0), _WAKE_AT_LEAST_EVERY)
        job.timer = ctx.call_later(delay, partial(self._wake, ctx, job))

    def _wake(self, ctx: Context, job: Job) -> None:
        job.timer = None
        if ctx.now() >= job.due:
            self._trigger(ctx, job, "interval")
        else:
            self._wait(ctx, job)

    def _trigger(self, ctx: Context, job: Job, trigger: Trigger) -> None:
        """Run `job` now, or once more after the run under way (however many triggers come meanwhile)."""
        if job.running is not None:
            if job.rerun is None:
                ctx.log.info("job %s: %s trigger during a run; it runs again after this one", job.name, trigger)
            job.rerun = job.rerun or trigger
            return
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        job.running, job.started = trigger, ctx.now()
        ctx.log.info("job %s (%s) started: %s", job.name, job.config.task, trigger)
        path = self.recorder.path
        if job.config.task == "analysis":
            analysed = partial(self._analysed, ctx, job)
            work = partial(analyse, path, job.started, self.zone, self.config)
            ctx.run_in_thread(work, lambda done: self._step(ctx, job, partial(analysed, done)))
        else:
            pruned = partial(self._pruned, ctx, job)
            cutoff = job.started - self.config.retention_days * 86400
            ctx.run_in_thread(
                partial(delete_before, path, cutoff), lambda done: self._step(ctx, job, partial(pruned, done))
            )

    def _finish(self, ctx: Context, job: Job) -> None:
        """Persist the run, report it and start the re-run or wait for the next scheduled run."""
        trigger, job.running = job.running, None
        job.state.last_run_ts, job.state.last_trigger = job.started, trigger
        self._save_states(ctx)
        if job.config.task == "analysis":
            self._report_last_run(ctx, ok=not job.failed)
        job.failed = False
        if job.rerun is not None:
            rerun, job.rerun = job.rerun, None
            self._trigger(ctx, job, rerun)
        else:
            self._arm(ctx, job)
        self._publish_next_run(ctx)

    # Jobs ----------------------------------------------------------------------------------------------------------

    def _step(self, ctx: Context, job: Job, step: Callable[[], None]) -> None:
        """Run one part of a job on the loop. Policy: an exception in a job (here, or from its background work) is
        counted as an error of its task and ends the run; the job keeps its schedule and the worker goes on."""
        try:
            step()
        except Exception as exc:  # policy: see the docstring
            ctx.log.exception("job %s failed", job.name)
            ctx.report_error(job.config.task, f"job {job.name}: {type(exc).__name__}: {exc}")
            if job.running is not None:
                job.waiting = job.analysis = None
                job.failed = True
                self._finish(ctx, job)

    def _pruned(self, ctx: Context, job: Job, done: Future[int]) -> None:
        days = self.config.retention_days
        ctx.log.info("job %s: deleted %d changes older than %d days", job.name, done.result(), days)
        self._finish(ctx, job)

    def _analysed(self, ctx: Context, job: Job, done: Future[Analysis]) -> None:
        job.analysis = done.result()
        if not (self.config.use_ai and job.analysis.suggestions):
            self._publish(ctx, job, "template")
            return
        self.requests += 1
        job.waiting = AiRequest(
            id=f"{ctx.name}-{job.name}-{self.requests}",
            task="phrase",
            items=[s.title for s in job.analysis.suggestions],
            reply_to=self.reply_topic,
        )
        ctx.publish(request_topic(ctx.site.base_topic), msgspec.json.encode(job.waiting), qos=1, local_only=True)
        not_phrased = partial(self._publish, ctx, job, "template")
        job.ai_timer = ctx.call_later(self.config.ai_timeout_seconds, partial(self._step, ctx, job, not_phrased))

    def _phrased(self, ctx: Context, job: Job, reply: AiReply) -> None:
        assert job.analysis is not None  # it waits for this reply
        if job.ai_timer is not None:
            job.ai_timer.cancel()
        if reply.fallback or len(reply.results) != len(job.analysis.suggestions):
            self._publish(ctx, job, "template")  # the model did not answer: our templates read better than rules
            return
        job.analysis.suggestions = [
            msgspec.structs.replace(s, title=title.strip() or s.title)
            for s, title in zip(job.analysis.suggestions, reply.results, strict=True)
        ]
        self._publish(ctx, job, "ai")

    def _publish(self, ctx: Context, job: Job, phrased_by: str) -> None:
        analysis, trigger = job.analysis, job.running
        assert analysis is not None and trigger is not None  # an analysis run is under way
        job.waiting = job.analysis = None
        for suggestion in analysis.suggestions:
            encoded = msgspec.json.encode(suggestion)
            ctx.publish(self.config.suggestion_topic, encoded, qos=1, expiry=SUGGESTION_EXPIRY_SECONDS)
        duration = round(ctx.now() - job.started, 3)
        count = len(analysis.suggestions)
        summary = Summary(
            patterns_detected=analysis.patterns,
            suggestions_generated=count,
            duration_seconds=duration,
            job=job.name,
            trigger=trigger,
            started_ts=job.started,
            phrased_by=phrased_by,
        )
        ctx.publish(self.config.summary_topic, msgspec.json.encode(summary), qos=1)
        ctx.log.info("job %s: %d patterns, %d suggestions in %.2f s", job.name, analysis.patterns, count, duration)
        job.state.last_duration_seconds, job.state.last_suggestions = duration, count
        self._publish_sensor(ctx, "last_duration", str(duration))
        self._publish_sensor(ctx, "suggestions", str(count))
        attributes = {"suggestions": [msgspec.structs.asdict(s) for s in analysis.suggestions]}
        self._publish_sensor(ctx, "suggestions/attributes", json.dumps(attributes))
        self._publish_sensor(ctx, "last_run", _iso(job.started))
        self._finish(ctx, job)

    # State, status and sensors -------------------------------------------------------------------------------------

    def _load_states(self, ctx: Context) -> dict[str, JobState]:
        try:
            return msgspec.json.decode(self.state_path.read_bytes(), type=dict[str, JobState])
        except FileNotFoundError:
            return {}
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            ctx.report_error("state", f"cannot read {self.state_path} ({exc}); starting without last runs")
            return {}

    def _save_states(self, ctx: Context) -> None:
        try:
            write_atomically(self.state_path, msgspec.json.encode({name: job.state for name, job in self.jobs.items()}))
        except OSError as exc:  # the jobs go on; a restart may catch up a run again
            ctx.report_error("state", f"cannot write {self.state_path}: {exc}")

    def _analysis_jobs(self) -> list[Job]:
        return [job for job in self.jobs.values() if job.config.task == "analysis"]

    def _report_last_run(self, ctx: Context, ok: bool | None = None) -> None:
        """Report the latest analysis run; `ok`: whether the run just finished did its work (None: no run)."""
        jobs = self._analysis_jobs()
        if not jobs:
            return
        last = max(jobs, key=lambda job: job.state.last_run_ts or 0.0)
        ctx.report_status(
            last_run_ts=last.state.last_run_ts,
            last_run_trigger=last.state.last_trigger,
            last_run_ok=ok,
            interval_seconds=last.schedule.period(ctx.now()),
        )

    def _publish_next_run(self, ctx: Context) -> None:
        waiting = [job.due for job in self._analysis_jobs() if job.running is None]
        if waiting:
            self._publish_sensor(ctx, "next_run", _iso(min(waiting)))

    def _publish_sensor(self, ctx: Context, sensor: str, value: str) -> None:
        ctx.publish(f"{self.topic}/{sensor}", value, qos=1, retain=True)

    def _entities(self, ctx: Context) -> list[Entity]:
        topic = self.topic
        return [
            Sensor(
                object_id="last_run",
                name="Last analysis",
                state_topic=f"{topic}/last_run",
                device_class="timestamp",
                icon="mdi:clock-check-outline",
            ),
            Sensor(
                object_id="next_run",
                name="Next analysis",
                state_topic=f"{topic}/next_run",
                device_class="timestamp",
                icon="mdi:clock-outline",
            ),
            Sensor(
                object_id="last_duration",
                name="Last analysis duration",
                state_topic=f"{topic}/last_duration",
                device_class="duration",
                unit_of_measurement="s",
                state_class="measurement",
                icon="mdi:timer-outline",
            ),
            Sensor(
                object_id="suggestions",
                name="Suggestions in the last analysis",
                state_topic=f"{topic}/suggestions",
                state_class="measurement",
                json_attributes_topic=f"{topic}/suggestions/attributes",
            ),
            Button(
                object_id="run_analysis",
                name="Run analysis now",
                command_topic=ctx.command_topic("run_analysis"),
                icon="mdi:play-circle-outline",
            ),
        ]


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
