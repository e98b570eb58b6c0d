"""The worker contract: the `Worker` base class, the `Context` it is given, and `Subscription`.

A worker is a module in `workers/` with one subclass of `Worker`. The supervisor sets `self.config` (an instance of
the class's `Config` Struct, decoded from the worker's `[workers.<name>]` section) before `on_start`, then calls
`on_message` once per message, one at a time, and `on_stop` on shutdown. Everything a worker does outside its own
process goes through its `Context`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

import msgspec

from contracts.envelopes import Message
from contracts.homeassistant import Device, Entity, Origin, title
from contracts.status import Trigger

T = TypeVar("T")


class Subscription(msgspec.Struct, frozen=True):
    """An MQTT topic filter (wildcards `+` and `#` allowed) a worker wants messages from, with the QoS to ask for.

    `commands=True` marks a filter whose messages are commands: a retained message there is a stale command (the
    broker replays it to every new subscriber), so the supervisor drops and counts it instead of delivering it.
    `local=True` marks a filter for what only the supervisor and its workers exchange: it is never subscribed at the
    broker, and a copy from the broker is never delivered through it (no other client can forge such a message).

    With a `handler`, each message on the filter goes to `handler(ctx, value, message)` instead of `on_message`,
    its payload decoded as `type`: a msgspec Struct (or any type msgspec decodes) from JSON, or from msgpack with
    `format="msgpack"`; `bytes` is the raw payload, `str` its UTF-8 text. JSON over `max_bytes` (if set) or nested
    too deep is refused. A payload that does not decode counts as a `decode` error and reaches no handler. When several
    filters match a topic, the first declared takes the message (see `contracts.handling`).
    """

    topic_filter: str
    qos: int = 0
    commands: bool = False
    local: bool = False
    handler: Callable[[Context, Any, Message], None] | None = None
    type: Any = bytes
    format: Literal["json", "msgpack"] = "json"
    max_bytes: int | None = None  # None: what the supervisor lets through ([mqtt] max_payload_bytes from the broker)


# Every worker's command that the supervisor carries out itself: a press on `<base>/cmd/<worker>/restart`.
RESTART_COMMAND = "restart"


class Site(msgspec.Struct, frozen=True, kw_only=True):
    """Where a worker runs: the supervisor's topics and Home Assistant's, from the supervisor's config."""

    base_topic: str = "supervisor"
    availability_topic: str = "supervisor/availability"
    discovery_prefix: str = "homeassistant"
    homeassistant_status_topic: str = "homeassistant/status"
    node_id: str = "supervisor"  # the supervisor's Home Assistant node (its client id, made topic-safe)
    sw_version: str = "0"
    host: str = "localhost"  # the supervisor's host name, as its Home Assistant devices are named
    support_url: str | None = None  # where to get help, for Home Assistant's `origin`
    status_page_url: str | None = None  # the supervisor's status page, when other machines reach it

    def supervisor_device(self) -> Device:
        """The supervisor's own Home Assistant device."""
        return Device(
            identifiers=[self.node_id],
            name=f"MQTT home supervisor on {self.host}",
            manufacturer="mqtt-home-supervisor",
            model="Supervisor",
            sw_version=self.sw_version,
            configuration_url=self.status_page_url,
        )

    def worker_device(self, worker: str, worker_title: str | None = None) -> Device:
        """The Home Assistant device of worker `worker` (shown as `worker_title`, default from its name): the
        supervisor's entities about it and every entity it declares, under the supervisor's device."""
        shown = worker_title or title(worker)
        return Device(
            identifiers=[f"{self.node_id}_{worker}"],
            name=f"{shown} on {self.host}",
            manufacturer="mqtt-home-supervisor",
            model=shown,
            sw_version=self.sw_version,
            via_device=self.node_id,
            configuration_url=self.status_page_url,
        )

    def origin(self) -> Origin:
        """What Home Assistant says published an entity."""
        return Origin(name="mqtt-home-supervisor", sw_version=self.sw_version, support_url=self.support_url)

    @property
    def status_topic(self) -> str:
        """The supervisor's status document (retained JSON, `contracts.status.Status`)."""
        return f"{self.base_topic}/status"

    @property
    def dead_letter_topic(self) -> str:
        """Where a message that kept killing its worker is published, with why."""
        return f"{self.base_topic}/dead_letter"

    def response_topic(self, action: str) -> str:
        """Where the control API answers a request that named no MQTT 5 response topic."""
        return f"{self.base_topic}/response/{action}"

    def last_crash_topic(self, worker: str) -> str:
        """When and how `worker` last crashed (retained JSON `{"time", "exit"}`)."""
        return f"{self.base_topic}/worker/{worker}/last_crash"

    def log_topic(self, worker: str) -> str:
        """`worker`'s log lines at or above `[supervisor] mqtt_log_level` (JSON, not retained)."""
        return f"{self.base_topic}/log/{worker}"

    def worker_own_topic(self, worker: str, *levels: str) -> str:
        """A topic of worker `worker`'s own: `<base>/<worker>/<levels...>` (its sensors, its replies)."""
        return "/".join((self.base_topic, worker, *levels))

    def worker_availability_topic(self, worker: str) -> str:
        """`online`/`offline` (retained) as worker `worker` runs and stops."""
        return f"{self.base_topic}/worker/{worker}/availability"

    def command_topic(self, worker: str, command: str) -> str:
        """Where a press of `worker`'s `command` button arrives; it reaches the worker as a `Command`, except
        `RESTART_COMMAND`, the supervisor's own."""
        return f"{self.base_topic}/cmd/{worker}/{command}"

    @property
    def commands_prefix(self) -> str:
        """What every command topic starts with."""
        return f"{self.base_topic}/cmd/"

    def restart_pressed(self, topic: str) -> str | None:
        """The worker whose restart button `topic` is, if it is one."""
        prefix, suffix = self.commands_prefix, f"/{RESTART_COMMAND}"
        if topic.startswith(prefix) and topic.endswith(suffix):
            worker = topic[len(prefix) : -len(suffix)]
            return worker if worker and "/" not in worker else None
        return None

    @property
    def entities_topic(self) -> str:
        """Local topic of the supervisor's `DiscoveryBundle`: every entity declared by it and its workers."""
        return f"{self.base_topic}/homeassistant/entities"

    @property
    def request_prefix(self) -> str:
        """`<base>/request/<action>` is the supervisor's control API."""
        return f"{self.base_topic}/request"


class Command(msgspec.Struct, frozen=True, kw_only=True):
    """A press of one of this worker's buttons (a message on `<base>/cmd/<worker>/<name>`)."""

    name: str
    payload: bytes = b""


class NoConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `Config` of a worker that takes no options."""


class Timer(Protocol):
    """A scheduled callback; `cancel` stops it from running again."""

    def cancel(self) -> None: ...


class Context(Protocol):
    """What a running worker may use: publishing, error reporting, logging, its state directory, time, timers."""

    name: str
    log: logging.Logger
    state_dir: Path
    config: Any
    site: Site

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 0,
        retain: bool = False,
        expiry: int | None = None,
        local_only: bool = False,
    ) -> None:
        """Send `payload` to `topic`: to local subscribers, and to the broker unless `local_only`."""
        ...

    def report_error(self, kind: str, detail: str) -> None:
        """Count one error of `kind` for this worker (shown in metrics and status) and log `detail`."""
        ...

    def now(self) -> float:
        """Seconds since the epoch, from a clock that tests can replace."""
        ...

    def every(self, seconds: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` every `seconds`, between messages, starting `seconds` from now."""
        ...

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` once, `seconds` from now, between messages."""
        ...

    def run_in_thread(self, work: Callable[[], T], then: Callable[[Future[T]], None]) -> None:
        """Run blocking `work` (HTTP, a model call) on a background thread; `then` gets its finished future on the
        worker's loop, between messages. Messages, timers and heartbeats go on meanwhile."""
        ...

    def command_topic(self, command: str) -> str:
        """The topic whose messages reach this worker's `on_command` as `Command(name=command)`."""
        ...

    def declare(self, entities: Sequence[Entity]) -> None:
        """Declare this worker's Home Assistant entities, replacing what it declared before.

        Filled in where not set: object_id and unique_id prefixed with the node and worker, a device for this
        worker (via the supervisor's), the origin, and availability over the supervisor's and this worker's topics
        with mode `all`. Raises ValueError for a button whose command topic is not one of `command_topic(...)`.
        """
        ...

    def report_status(
        self,
        *,
        last_run_ts: float | None = None,
        last_run_trigger: Trigger | None = None,
        last_run_ok: bool | None = None,
        interval_seconds: float | None = None,
        ai_enabled: bool | None = None,
        ai_model: str | None = None,
        event_count: int | None = None,
        **fields: Any,
    ) -> None:
        """Set fields of this worker's entry in the supervisor's status document; None leaves a field as it is.
        `fields` are the worker's own (`report_status(queue_length=3)`), shown under `fields` in its entry: plain
        JSON values, at most 4 KiB; ValueError otherwise.

        A run reported with `last_run_ok` counts toward the supervisor's health: while a worker's last few runs
        (messages handled or runs reported) have all failed, the status is `degraded`."""
        ...

    def subscribe(self, topic_filter: str | Subscription, qos: int = 0) -> None:
        """Also receive messages on a topic filter from now on (until the worker stops): a `Subscription`, as
        `subscriptions()` returns them (with a `handler`, its messages go there), or a filter and a QoS for
        `on_message`. Raises ValueError for an invalid filter, a QoS other than 0, 1 or 2, or `commands` or `local`,
        which only `subscriptions()` can set."""
        ...


ConfigT = TypeVar("ConfigT", bound=msgspec.Struct)


class Worker(Generic[ConfigT]):
    """Base class of every worker. Subclasses set `name` and `Config` and override the hooks they need.

    The hooks, in order. Every hook but `subscriptions` runs in the worker's own process, on its one thread, one at
    a time: a hook, a message handler and a timer callback never run at once. State is set up in `on_start`
    (`__init__` runs in the supervisor too, to call `subscriptions`, so keep it to plain defaults).

    - `subscriptions()`: the topic filters it takes, each with an optional typed `handler`. Called in the
      supervisor process at start (to subscribe) and again in the worker process (to dispatch), after `config` and
      `site` are set. An exception there, or an invalid filter, is a config error in the supervisor (it does not
      start); in the worker process, a failed start like one of `on_start`.
    - `on_start(ctx)`: once, before the first message. Raising is a crash (error kind `start`): the process exits
      and the supervisor restarts it by its restart policy; `on_stop` does not run.
    - each message, one at a time: a press of one of its buttons to `on_command`, a message on a filter with a
      handler to that handler, any other to `on_message`. Raising counts one `handler` error (a payload that does
      not decode: `decode`) and the worker goes on with the next message. The same for timer callbacks
      (`ctx.every`, `ctx.call_later`) and `run_in_thread` results, which run between messages.
    - `on_stop(ctx)`: once, when the worker is asked to stop (a stop or restart request, the supervisor stopping)
      or the supervisor is gone, after the message in hand. Raising counts one `stop` error; the process still
      exits normally. It does not run after a kill (SIGKILL: a hung worker, its memory limit, the OOM killer) or a
      failed `on_start`: what must survive those belongs on disk as it changes (`ctx.state_dir`).
    """

    name: ClassVar[str]
    # How a person reads its name ("Web scraper"), in its Home Assistant device's name; None: from `name`.
    title: ClassVar[str | None] = None
    Config: ClassVar[type[msgspec.Struct]] = NoConfig
    # The kinds this worker passes to `ctx.report_error`: served at 0 in the metrics from the start (so alerts and
    # rate() see the first one). Another kind is still counted, from its first report on.
    error_kinds: ClassVar[tuple[str, ...]] = ()
    # Its memory limit (MiB) unless its section sets `memory_limit_mb`; None: no limit.
    memory_limit_mb: ClassVar[int | None] = None
    # A section that runs it with no outside service, for the test every discovered worker goes through (start, one
    # real message, stop) and for trying it out; `example_message` is that message.
    example_config: ClassVar[dict[str, Any]] = {}
    config: ConfigT
    site: Site = Site()  # set with `config`, before `subscriptions()`

    def subscriptions(self) -> list[Subscription]:
        """The topic filters this worker receives (see the class docstring)."""
        return []

    def example_message(self) -> tuple[str, bytes] | None:
        """A message it handles (topic, payload) when `config` is `example_config`; None: it takes none."""
        return None

    def on_start(self, ctx: Context) -> None:
        """Called once in the worker process before the first message (see the class docstring)."""

    def on_message(self, ctx: Context, message: Message) -> None:
        """Called for each message that no typed handler takes, one at a time."""

    def on_command(self, ctx: Context, command: Command) -> None:
        """Called for a press of one of this worker's buttons (`ctx.command_topic(name)`); `restart` is the
        supervisor's and never arrives here."""
        ctx.log.warning("ignored unknown command %r", command.name)

    def on_stop(self, ctx: Context) -> None:
        """Called once when the worker is asked to stop; not after a kill or a failed start (see the class
        docstring)."""
