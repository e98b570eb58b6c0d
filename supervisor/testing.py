"""A harness for testing a worker in one process: its hooks run as in its own process, with no broker, no
supervisor and no processes, and time moves only when the test says.

    from supervisor.testing import WorkerHarness
    from workers.doorbell import Doorbell

    def test_the_button_rings_the_chime(tmp_path):
        bell = WorkerHarness(Doorbell, {"button_topic": "home/door", "chime_topic": "home/chime"}, tmp_path)
        bell.start()
        bell.receive("home/door", "pressed")
        assert [(p.topic, p.payload) for p in bell.published] == [("home/chime", b"ring")]
        bell.stop()

The worker gets the real `Context` of a worker process (`supervisor.worker_context`), and each message goes
through the same handling as there (`supervisor.worker_loop.Handling`): commands to `on_command`, typed handlers,
`on_message`, and the failure policy (an exception is counted as a `handler` error, a payload that does not
decode as a `decode` error; `errors` has them). What it publishes, reports and declares is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from contracts import (
    EntitiesDeclared,
    ErrorReported,
    Message,
    Publish,
    Site,
    StatusReported,
    Subscribe,
    Worker,
    WorkerFacts,
)
from contracts.homeassistant import title
from contracts.topics import matches
from supervisor.config import SUPERVISION_KEYS
from supervisor.loop import Loop
from supervisor.worker_context import WorkerContext
from supervisor.worker_loop import Handling, stop

W = TypeVar("W", bound=Worker)  # type: ignore[type-arg]


class WorkerHarness(Generic[W]):
    """One worker of class `worker_class` with `config` (a mapping as in its TOML section, or its Config Struct),
    keeping its files in `state_dir`, at `site` (the supervisor's topics)."""

    def __init__(
        self,
        worker_class: type[W],
        config: Mapping[str, Any] | msgspec.Struct | None = None,
        state_dir: Path | str = ".",
        site: Site | None = None,
        *,
        now: float = 1_700_000_000.0,
    ) -> None:
        self.worker: W = worker_class()
        if not isinstance(config, msgspec.Struct):  # a section: the supervisor's keys in it are not the worker's
            own = {key: value for key, value in (config or {}).items() if key not in SUPERVISION_KEYS}
            config = msgspec.convert(own, worker_class.Config)
        self.worker.config = config
        self.worker.site = site or Site()
        self.time = now  # what ctx.now() says; its timers run on this clock too
        self.loop = Loop(clock=lambda: self.time)
        directory = Path(state_dir)
        directory.mkdir(parents=True, exist_ok=True)
        name = worker_class.name
        shown = worker_class.title or title(name)
        self.ctx = WorkerContext(name, config, directory, self.loop, self.worker.site, lambda: self.time, shown)
        self.handling = Handling(self.worker, self.ctx)
        self.subscriptions = self.worker.subscriptions()
        self.published: list[Publish] = []
        self.errors: list[tuple[str, str]] = []
        self.entities: list[dict[str, Any]] = []  # the discovery configs it declared last, as Home Assistant gets them
        self.status = WorkerFacts()  # what it reported, merged as the supervisor does
        self.subscribed: list[tuple[str, int]] = []  # what it subscribed to while running
        self._ids = 0

    # Its hooks ------------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run `on_start` (an exception from it propagates: in a worker process it is a crash)."""
        self.worker.on_start(self.ctx)
        self._collect()

    def receive(
        self,
        topic: str,
        payload: bytes | str = b"",
        *,
        qos: int = 0,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> bool:
        """Hand the worker a message as the supervisor would; True when it was handled without an error. Raises
        LookupError for a topic that none of its subscriptions (or its command topics) matches.

        As the supervisor does, a retained message on a command topic is not delivered but counted as a
        `retained_command` error (False), and an empty one there (a retained press being cleared) is ignored (True).
        """
        filters = [s.topic_filter for s in self.subscriptions] + [t for t, _ in self.subscribed]
        commands = self.ctx.command_topic("")
        command = topic.startswith(commands) or any(
            s.commands and matches(s.topic_filter, topic) for s in self.subscriptions
        )
        if not command and not any(matches(f, topic) for f in filters):
            raise LookupError(f"{self.worker.name} does not subscribe to {topic!r} (filters: {', '.join(filters)})")
        data = payload.encode() if isinstance(payload, str) else payload
        if command and retain:
            self.errors.append(("retained_command", f"a retained message on a command topic: {topic}"))
            return False
        if topic.startswith(commands) and not data:
            return True
        self._ids += 1
        message = Message(
            id=self._ids,
            topic=topic,
            payload=data,
            qos=qos,
            retain=retain,
            response_topic=response_topic,
            correlation_data=correlation_data,
        )
        failed = self.handling.handle(message)
        self._collect()
        return not failed

    def press(self, command: str, payload: bytes | str = b"PRESS") -> bool:
        """A press of the worker's button `command` (what Home Assistant sends); True when handled without error."""
        return self.receive(self.ctx.command_topic(command), payload)

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass: every timer due by then runs, in order, each at its time."""
        target = self.time + seconds
        while (due := self.loop.next_due()) is not None and due <= target:
            self.time = max(self.time, due)
            self.loop.run_once(max_wait=0)
        self.time = target
        self._collect()

    def finish_threads(self, timeout: float = 10.0) -> None:
        """Wait (really) until the work it gave `run_in_thread` is done and its callbacks have run."""
        deadline = time.monotonic() + timeout
        while self.ctx.threads_busy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"run_in_thread work still running after {timeout} s")
            self.loop.run_once(max_wait=0.05)
        self._collect()

    def stop(self) -> None:
        """Run `on_stop` (an exception from it is counted as a `stop` error, as in a worker process)."""
        stop(self.worker, self.ctx)
        self._collect()

    # What it did ----------------------------------------------------------------------------------------------------

    def published_to(self, topic: str) -> list[bytes]:
        """The payloads it published to `topic`, oldest first."""
        return [p.payload for p in self.published if p.topic == topic]

    def _collect(self) -> None:
        for envelope in self.ctx.outgoing:
            match envelope:
                case Publish():
                    self.published.append(envelope)
                case ErrorReported(kind=kind, detail=detail):
                    self.errors.append((kind, detail))
                case EntitiesDeclared(entities=entities):
                    self.entities = [msgspec.json.decode(e.config) for e in entities]
                case StatusReported(facts=facts):
                    self.status = self.status.merged(facts)
                case Subscribe(topic_filter=topic_filter, qos=qos):
                    self.subscribed.append((topic_filter, qos))
        self.ctx.outgoing.clear()
