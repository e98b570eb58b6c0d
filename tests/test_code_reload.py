"""A worker restarted (its restart button, a restart request, a crash) runs its module as it is on disk now, not
the copy the supervisor imported at start; a broken new version fails that worker's start and nothing else."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import SupervisorFactory
from support import MqttProbe

LIVE = '''"""Live: consumes `topic`, produces its VERSION on `out`, touches nothing."""

import msgspec

from contracts import Context, Message, Subscription, Worker

VERSION = "{version}"


class LiveConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    topic: str
    out: str


class Live(Worker[LiveConfig]):
    """Answers every message with its version."""

    name = "live"
    Config = LiveConfig

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(self.config.topic, qos=1)]

    def on_message(self, ctx: Context, message: Message) -> None:
        ctx.publish(self.config.out, VERSION, qos=1)
'''


def write(module: Path, text: str) -> None:
    """Write `text` as the module's new version, its modification time surely later than the last."""
    before = module.stat().st_mtime_ns if module.exists() else 0
    module.write_text(text)
    os.utime(module, ns=(before + 2_000_000_000, before + 2_000_000_000))


def test_a_restarted_worker_runs_its_changed_module_and_a_broken_one_fails_only_its_start(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, tmp_path: Path
) -> None:
    package = tmp_path / "livepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "live.py"
    write(module, LIVE.format(version="1"))
    topic, out, base = f"{prefix}/in", f"{prefix}/out", supervisors.base
    mqtt.subscribe(f"{prefix}/#")
    supervisors.python_path = [tmp_path]
    supervisors.start({"live": {"topic": topic, "out": out}}, supervisor={"worker_packages": ["livepkg"]})
    status = f"{base}/status"

    def running_after(restarts: int) -> None:
        mqtt.wait_for(status, lambda m: m.json()["workers"]["live"]["restarts"] == restarts)
        mqtt.wait_for(
            status,
            lambda m: (
                m.json()["workers"]["live"]["restarts"] == restarts
                and m.json()["workers"]["live"]["state"] == "running"
            ),
        )

    def answer(count: int) -> str:
        mqtt.publish(topic, "which?", qos=1)
        return mqtt.wait_for(out, count=count)[-1].text

    running_after(0)
    assert answer(1) == "1"
    write(module, LIVE.format(version="2"))
    mqtt.publish(f"{base}/cmd/live/restart", "PRESS")
    running_after(1)
    assert answer(2) == "2"
    write(module, LIVE.format(version="3").replace("VERSION = ", "VERSION = = "))  # saved mid-edit
    mqtt.publish(f"{base}/request/restart", json.dumps({"worker": "live"}))
    broken = mqtt.wait_for(status, lambda m: m.json()["workers"]["live"]["errors"].get("start", 0) >= 1)[-1].json()
    assert broken["workers"]["live"]["last_exit"].endswith("(start_failed)")
    write(module, LIVE.format(version="4"))
    mqtt.publish(f"{base}/request/restart", json.dumps({"worker": "live"}))
    mqtt.wait_for(
        status,
        lambda m: m.json()["workers"]["live"]["state"] == "running" and m.json()["workers"]["live"]["restarts"] >= 3,
    )
    assert answer(3) == "4"
