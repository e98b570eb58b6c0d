"""Echo: a test worker whose behaviour the payload chooses.

Consumes: every topic in `topics`. Produces: `<out>/started` (its pid) on start, and for each message a JSON reply
on `<out>/echo`, unless the payload is a command:
- `crash` (or `crash:<anything>`) exits the process at once; `crash_once:<path>` does so only if `<path>` does not
  exist yet (creating it);
  `exit:<code>` calls `sys.exit(code)` (a worker ending itself, which is a crash for any code but 0);
- `raise` raises in the handler; `json:<text>` parses `<text>` as JSON first (failing as a worker does on a payload
  it cannot decode);
- `hang` sleeps for an hour; `sleep:<seconds>` sleeps, then replies;
- `hog` allocates memory without end in the handler; `grow:<MiB>` adds that much every half second from a timer;
- `timer_raise` schedules a timer that raises; `block` publishes `<out>/blocked` and schedules a timer that sleeps
  for an hour (so heartbeats stop while no message is in hand);
- `thread:<seconds>` sleeps on a background thread (`ctx.run_in_thread`), then publishes `slept <seconds>` on
  `<out>/thread`; `thread_raise` raises there instead (the worker then reports it as a `handler` error);
- `subscribe:<filter>` subscribes to one more filter (`ctx.subscribe`) and replies;
- `forward:<topic>` publishes to `<topic>`; `big:<n>` publishes `n` bytes on `<out>/big`; `env:<NAME>` publishes
  the environment variable NAME (or `<unset>`) on `<out>/env`; `find:<sha256>` publishes on `<out>/found` how many
  strings or bytes reachable from any Python object of the process (the collector unfrozen first, as a snooping
  worker would) have that SHA-256.
Touches nothing outside.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import msgspec

from contracts import Context, Message, Subscription, Worker


class EchoConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    topics: list[str]
    out: str
    qos: int = 0
    local_only: bool = False
    commands: bool = False  # mark the subscriptions as command topics (retained messages there are dropped)
    delay_seconds: float = 0.0  # time taken by every message, so that a backlog builds up
    secret_env: str | None = None  # a secret variable this worker is given (read with `env:<NAME>`)


def _sleep_or_raise(seconds: float, text: str) -> str:
    if text == "thread_raise":
        raise RuntimeError("asked to raise on a thread")
    time.sleep(seconds)
    return f"slept {seconds:g}"


def _count_reachable(sha256: str) -> int:
    gc.unfreeze()
    found = 0
    for container in gc.get_objects():
        for value in gc.get_referents(container):
            if isinstance(value, (str, bytes)):
                data = value.encode(errors="surrogatepass") if isinstance(value, str) else value
                found += hashlib.sha256(data).hexdigest() == sha256
    return found


def _divide_by_zero() -> None:
    """The `timer_raise` timer: a bug in a timer callback (ZeroDivisionError: division by zero)."""
    _ = 1 / 0


class Echo(Worker[EchoConfig]):
    """Replies to every message on `<out>/echo`; see the module docstring for the commands it obeys."""

    name = "echo"
    Config = EchoConfig

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(t, qos=self.config.qos, commands=self.config.commands) for t in self.config.topics]

    def on_start(self, ctx: Context) -> None:
        ctx.publish(f"{self.config.out}/started", str(os.getpid()), qos=1)

    def _slept(self, ctx: Context, result: str) -> None:
        ctx.publish(f"{self.config.out}/thread", result, qos=1)

    def on_message(self, ctx: Context, message: Message) -> None:
        text = message.payload.decode(errors="replace")
        time.sleep(self.config.delay_seconds)
        if text == "crash" or text.startswith("crash:"):
            os._exit(9)
        if text.startswith("crash_once:"):
            marker = Path(text.removeprefix("crash_once:"))
            if not marker.exists():
                marker.touch()
                os._exit(9)
        if text.startswith("exit:"):
            sys.exit(int(text.removeprefix("exit:")))
        if text == "raise":
            raise RuntimeError("asked to raise")
        if text == "hang":
            time.sleep(3600)
        if text == "hog":
            self.hoard = [b"x" * 2**20 for _ in iter(int, 1)]  # never ends: MemoryError at the limit
        if text.startswith("grow:"):
            step = int(text.removeprefix("grow:")) * 2**20
            self.hoard = []
            ctx.every(0.5, lambda: self.hoard.append(b"x" * step))
            return
        if text == "timer_raise":
            ctx.call_later(0, _divide_by_zero)
            return
        if text == "block":
            ctx.publish(f"{self.config.out}/blocked", str(os.getpid()), qos=1)  # sent before the timer runs
            ctx.call_later(0, lambda: time.sleep(3600))
            return
        if text.startswith("sleep:"):
            time.sleep(float(text.removeprefix("sleep:")))
        if text.startswith("json:"):
            json.loads(text.removeprefix("json:"))  # raises on bad JSON: a decode error, as a real worker's would
        if text.startswith("thread:") or text == "thread_raise":
            seconds = float(text.removeprefix("thread:")) if text != "thread_raise" else 0.0
            ctx.run_in_thread(lambda: _sleep_or_raise(seconds, text), lambda done: self._slept(ctx, done.result()))
            return
        if text.startswith("subscribe:"):
            ctx.subscribe(text.removeprefix("subscribe:"), qos=1)
        if text.startswith("env:"):
            ctx.publish(f"{self.config.out}/env", os.environ.get(text.removeprefix("env:"), "<unset>"), qos=1)
            return
        if text.startswith("find:"):
            ctx.publish(f"{self.config.out}/found", str(_count_reachable(text.removeprefix("find:"))), qos=1)
            return
        if text.startswith("big:"):
            ctx.publish(f"{self.config.out}/big", b"x" * int(text.removeprefix("big:")), qos=self.config.qos)
            return
        if text.startswith("forward:"):
            ctx.publish(
                text.removeprefix("forward:"),
                f"from {ctx.name}",
                qos=self.config.qos,
                local_only=self.config.local_only,
            )
            return
        reply = {
            "worker": ctx.name,
            "topic": message.topic,
            "payload": text,
            "qos": message.qos,
            "retain": message.retain,
            "response_topic": message.response_topic,
            "attempt": message.attempt,
            "crashes": message.crashes,
            "publication_id": getattr(message, "publication_id", None),
            "pid": os.getpid(),
        }
        ctx.publish(f"{self.config.out}/echo", json.dumps(reply), qos=self.config.qos)
