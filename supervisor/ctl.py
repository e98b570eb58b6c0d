"""`python -m supervisor --config PATH ctl ACTION [WORKER]`: ask the running supervisor, as supervisorctl does.

It talks to the supervisor through its control API on the broker (`supervisor.control`), with the broker and
credentials of the same config: `status` prints a table of the workers, `restart`, `stop` and `start` act on one,
`republish` asks for the status and every availability again. Exit codes: 0 done, 1 the supervisor refused or did
not answer, 2 bad command line or config, 3 the broker cannot be reached.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

from supervisor import mqtt
from supervisor.config import Settings

ACTIONS = ("status", "restart", "stop", "start", "republish")
WORKER_ACTIONS = ("restart", "stop", "start")
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def run(settings: Settings, action: str, worker: str | None, timeout: float) -> int:
    """Carry out `action` (on `worker`) and print the answer; returns the exit code."""
    if (action in WORKER_ACTIONS) != (worker is not None):
        needs = "needs a worker name" if action in WORKER_ACTIONS else "takes no worker name"
        print(f"error: ctl {action} {needs}", file=sys.stderr)
        return EXIT_USAGE
    base, config = settings.supervisor.base_topic, settings.mqtt
    transaction = os.urandom(6).hex()
    body: dict[str, Any] = {"transaction": transaction}
    if worker is not None:
        body["worker"] = worker
    answer_topic = f"{base}/response/ctl-{transaction}" if config.protocol == 5 else f"{base}/response/{action}"
    try:
        raw = mqtt.request(
            config,
            settings.password,
            f"{base}/request/{action}",
            json.dumps(body).encode(),
            answer_topic,
            lambda payload: _transaction_of(payload) == transaction,
            timeout,
        )
    except OSError as exc:
        print(f"error: cannot reach the broker at {config.host}:{config.port}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if raw is None:
        print(
            f"error: no supervisor answered on {base}/request/{action} within {timeout:g} s "
            f"(is one running on {config.host}:{config.port} with base_topic {base!r}?)",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    answer = json.loads(raw)
    if not answer.get("ok"):
        print(f"error: {answer.get('error')}", file=sys.stderr)
        return EXIT_REFUSED
    if action == "status":
        print(status_table(answer["status"]), flush=True)
    elif worker is not None:
        print(f"{worker}: {answer.get('state')}", flush=True)
    else:
        print("ok", flush=True)
    return EXIT_OK


def status_table(status: dict[str, Any], now: datetime | None = None) -> str:
    """The status document as a person reads it in a terminal: one line for the supervisor, one per worker."""
    now = now or datetime.now(UTC)
    mqtt_state = "connected" if status["mqtt"]["connected"] else "not connected"
    lines = [f"supervisor {status['status']} (version {status['sw_version']}, MQTT {mqtt_state})"]
    lines += [f"  {problem}" for problem in status.get("problems", [])]
    rows = [("WORKER", "STATE", "PID", "UPTIME", "RESTARTS", "ERRORS", "LAST EXIT")]
    for name, worker in status["workers"].items():
        since = worker.get("running_since")
        uptime = _duration(now - datetime.fromisoformat(since)) if since else "-"
        rows.append(
            (
                name,
                worker["state"],
                str(worker["pid"] or "-"),
                uptime,
                str(worker["restarts"]),
                str(worker["error_count"]),
                worker["last_exit"] or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return "\n".join(line.rstrip() for line in lines)


def _duration(delta: Any) -> str:
    seconds = max(int(delta.total_seconds()), 0)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def _transaction_of(payload: bytes) -> object:
    try:
        answer = json.loads(payload)
    except ValueError:
        return None
    return answer.get("transaction") if isinstance(answer, dict) else None
