"""The status page and the health check served next to /metrics: the status document as HTML and as a verdict.

`/` is a small self-contained HTML page (no script, no external file) a person opens in a browser; `/healthz` is
what Docker's and Kubernetes' health checks and uptime monitors expect: 200 while the status is `ok`, 503 with
a one-line reason otherwise.
"""

from __future__ import annotations

import html
from typing import Any

_STYLE = (
    "body{font:15px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
    "td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}"
    ".ok,.running{color:#16794c}.degraded,.starting,.backoff,.stopping{color:#a15c00}"
    ".error,.failed,.stopped{color:#b3261e}"
)


def health(status: dict[str, Any]) -> tuple[int, str]:
    """(HTTP status, one line) for `/healthz`."""
    if status["status"] == "ok":
        return 200, "ok"
    reasons = "; ".join(status.get("problems") or []) or "no reason given"
    return 503, f"{status['status']}: {reasons}"


def page(status: dict[str, Any]) -> bytes:
    """The status document as an HTML page."""
    e = html.escape
    mqtt = status["mqtt"]
    rows = "".join(
        f"<tr><td>{e(name)}</td><td class='{e(w['state'])}'>{e(w['state'])}</td><td>{w['pid'] or ''}</td>"
        f"<td>{w['restarts']}</td><td>{w['error_count']}</td><td>{w['handled']}</td>"
        f"<td>{e(w['last_exit'] or '')}</td><td>{e(w['last_exit_time'] or '')}</td>"
        f"<td>{e(w.get('last_crash_time') or '')}</td></tr>"
        for name, w in status["workers"].items()
    )
    problems = "".join(f"<li>{e(problem)}</li>" for problem in status.get("problems") or [])
    text = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>mqtt-home-supervisor: {e(status['status'])}</title><style>{_STYLE}</style></head><body>"
        f"<h1>mqtt-home-supervisor <span class='{e(status['status'])}'>{e(status['status'])}</span></h1>"
        f"<p>version {e(status['sw_version'])}, up {_duration(status['uptime_seconds'])}, MQTT "
        f"{'connected' if mqtt['connected'] else 'not connected'} ({mqtt['reconnects']} reconnects), "
        f"{status['outbox_messages']} publications in the outbox; as of {e(status['last_updated'])}</p>"
        + (f"<ul>{problems}</ul>" if problems else "")
        + "<table><tr><th>worker</th><th>state</th><th>pid</th><th>restarts</th><th>errors</th><th>handled</th>"
        "<th>last exit</th><th>at</th><th>last crash</th></tr>"
        f"{rows}</table><p><a href='/metrics'>metrics</a> · <a href='/healthz'>health</a></p></body></html>\n"
    )
    return text.encode()


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m {seconds}s"
