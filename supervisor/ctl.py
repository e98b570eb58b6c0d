"""`python -m supervisor --config PATH ctl ACTION [WORKER]`: ask the running supervisor, as supervisorctl does.

It talks to the supervisor through its control API on the broker (`supervisor.control`), with the broker and
credentials of the same config: `status` prints a table of the workers, `restart`, `stop` and `start` act on one,
`reload` has it read its config file again and says what changed, `republish` asks for the status and every
availability again, and `tail` follows one worker's log lines (`<base>/log/<worker>`) until Ctrl-C (or `--lines`
of them). Exit codes: 0 done, 1 the supervisor refused or did not answer, 2 bad command line or config, 3 the
broker cannot be reached (or, for `tail`, the connection was lost).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

from supervisor import mqtt
from supervisor.config import Settings

ACTIONS = ("status", "restart", "stop", "start", "reload", "republish", "tail")
WORKER_ACTIONS = ("restart", "stop", "start", "tail")
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def run(settings: Settings, action: str, worker: str | None, timeout: float, lines: int | None = None) -> int:
    """Carry out `action` (on `worker`) and print the answer; returns the exit code."""
    if (action in WORKER_ACTIONS) != (worker is not None):
        needs = "needs a worker name" if action in WORKER_ACTIONS else "takes no worker name"
        print(f"error: ctl {action} {needs}", file=sys.stderr)
        return EXIT_USAGE
    if action == "tail":
        assert worker is not None
        return _tail(settings, worker, timeout, lines)
    code, _ = _ask(settings, action, worker, timeout)
    return code


def _ask(settings: Settings, action: str, worker: str | None, timeout: float, quiet: bool = False) -> tuple[int, Any]:
    """Send the request, print its answer (unless `quiet` and it succeeded); returns the exit code and the
    answer."""
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
        return EXIT_UNREACHABLE, None
    if raw is None:
        print(
            f"error: no supervisor answered on {base}/request/{action} within {timeout:g} s "
            f"(is one running on {config.host}:{config.port} with base_topic {base!r}?)",
            file=sys.stderr,
        )
        return EXIT_REFUSED, None
    answer = json.loads(raw)
    if not answer.get("ok"):
        print(f"error: {answer.get('error')}", file=sys.stderr)
        return EXIT_REFUSED, answer
    if quiet:
        pass
    elif action == "status":
        print(status_table(answer["status"]), flush=True)
    elif action == "reload":
        print(reload_summary(answer), flush=True)
    elif worker is not None:
        print(f"{worker}: {answer.get('state')}", flush=True)
    else:
        print("ok", flush=True)
    return EXIT_OK, answer


def _tail(settings: Settings, worker: str, timeout: float, lines: int | None) -> int:
    """Print worker `worker`'s log lines as they come, after asking the supervisor that it runs such a worker."""
    code, answer = _ask(settings, "status", None, timeout, quiet=True)
    if code != EXIT_OK:
        return code
    workers = answer["status"]["workers"]
    if worker not in workers:
        print(f"error: no worker named {worker!r}; workers: {', '.join(workers) or 'none'}", file=sys.stderr)
        return EXIT_REFUSED
    topic = f"{settings.supervisor.base_topic}/log/{worker}"
    print(f"following {topic} (lines at {settings.supervisor.mqtt_log_level} and above; Ctrl-C to stop)", flush=True)
    printed = 0
    try:
        for payload in mqtt.follow(settings.mqtt, settings.password, topic):
            print(log_line(payload), flush=True)
            printed += 1
            if lines is not None and printed >= lines:
                break
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def log_line(payload: bytes) -> str:
    """One line of `<base>/log/<worker>` as `ctl tail` prints it."""
    try:
        line = json.loads(payload)
        text = f"{line['time']} {line['level']} {line['logger']}: {line['message']}"
    except (ValueError, KeyError, TypeError):
        return payload.decode(errors="replace")
    dropped = line.get("dropped")
    return f"({dropped} lines left out)\n{text}" if dropped else text


def reload_summary(answer: dict[str, Any]) -> str:
    """What a reload did, as a person reads it."""
    lines = [
        f"{what.replace('_', ' ')}: {', '.join(answer[what])}"
        for what in ("added", "removed", "changed", "restart_needed")
        if answer.get(what)
    ]
    lines += [f"not loaded, the running version stays: {e}" for e in answer.get("kept_modules", {}).values()]
    return "\n".join(["reloaded", *lines]) if lines else "reloaded: nothing changed"


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
