"""The control API: requests on `<base>/request/<action>` and restart presses on `<base>/cmd/<worker>/restart`.

A request carries JSON, `{"worker": "<name>"}` for `restart`, `stop` and `start`, nothing for `status`,
`republish` (status and availability published again) and `reload` (the config file read again and applied: see
`supervisor.reloading`; the answer says what it added, removed, changed and what waits for a restart). The reply
is JSON, `{"ok": true, ...}` or `{"ok": false, "error": "..."}`, sent to the request's MQTT 5 response topic with
its correlation data, or else to `<base>/response/<action>`, with the request's `transaction` field if it had one
(so that an MQTT 3.1.1 client can match it). A press on `<base>/cmd/<worker>/restart` (Home Assistant's restart
button) restarts that worker and has no reply; the worker's other commands go to the worker itself. Both are
command topics: retained messages are ignored. Workers reach this API too, by publishing a request (it is
delivered locally).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from contracts import Message, Site
from contracts.decoding import BoundedJson
from supervisor.errors import ControlError

log = logging.getLogger("supervisor")

_request_decoder: BoundedJson[Any] = BoundedJson(max_bytes=64 * 1024)  # a request is a few dozen bytes

NAME = "supervisor"  # the router's name for the supervisor's own subscriptions; no worker may take it


class Workers(Protocol):
    """What the control API can ask of the workers (the worker pool); each returns the worker's state now."""

    def restart_worker(self, name: str) -> str: ...

    def stop_worker(self, name: str) -> str: ...

    def start_worker(self, name: str) -> str: ...


class Status(Protocol):
    """What the control API can ask of the status (the status reporter)."""

    def document(self) -> Any:
        """The status document as plain values."""
        ...

    def republish(self) -> None: ...


Reply = Callable[[str, bytes, bytes | None], None]  # (topic, payload, correlation data)
Reload = Callable[[str], dict[str, Any]]  # (why) -> what it did; raises ControlError when it changed nothing


class ControlAPI:
    def __init__(self, site: Site, workers: Workers, status: Status, reply: Reply, reload: Reload) -> None:
        self.site = site
        self.workers = workers
        self.status = status
        self.reply = reply
        self.reload = reload

    @property
    def filters(self) -> list[str]:
        """What the supervisor subscribes to for itself. Restart presses arrive through each worker's own command
        filter (`<base>/cmd/<worker>/+`): one more filter here would overlap them all."""
        return [f"{self.site.request_prefix}/+"]

    def handle(self, message: Message) -> None:
        pressed = self.site.restart_pressed(message.topic)
        prefix = f"{self.site.request_prefix}/"
        if pressed is not None:
            self._restart_pressed(worker=pressed)
        elif message.topic.startswith(prefix) and "/" not in message.topic[len(prefix) :]:
            self._request(message.topic[len(prefix) :], message)

    def _restart_pressed(self, worker: str) -> None:
        try:
            self.workers.restart_worker(worker)
        except ControlError as exc:
            log.warning("restart button for %s: %s", worker, exc)

    def _request(self, action: str, message: Message) -> None:
        try:
            body = self._carry_out(action, message.payload)
            answer: dict[str, Any] = {"ok": True, **body}
        except ControlError as exc:
            answer = {"ok": False, "error": str(exc)}
        transaction = _transaction(message.payload)
        if transaction is not None:  # what lets an MQTT 3.1.1 client (no correlation data) match the answer
            answer["transaction"] = transaction
        log.info("control request %s: %s", action, "ok" if answer["ok"] else answer["error"])
        topic = message.response_topic or self.site.response_topic(action)
        self.reply(topic, json.dumps(answer).encode(), message.correlation_data)

    def _carry_out(self, action: str, payload: bytes) -> dict[str, Any]:
        """What `action` answers; raises ControlError."""
        if action == "status":
            return {"status": self.status.document()}
        if action == "republish":
            self.status.republish()
            return {}
        if action == "reload":
            return self.reload("a control request")
        commands = {
            "restart": self.workers.restart_worker,
            "stop": self.workers.stop_worker,
            "start": self.workers.start_worker,
        }
        if action not in commands:
            raise ControlError(
                f"unknown action {action!r}; expected one of: reload, republish, restart, start, status, stop"
            )
        try:
            request = _request_decoder.decode(payload or b"{}")
        except msgspec.DecodeError as exc:
            raise ControlError(f'expected JSON like {{"worker": "<name>"}}, got {payload[:80]!r}: {exc}') from None
        worker = request.get("worker") if isinstance(request, dict) else None
        if not isinstance(worker, str):
            raise ControlError(f'expected {{"worker": "<name>"}}, got {payload[:80]!r}')
        return {"worker": worker, "state": commands[action](worker)}


def _transaction(payload: bytes) -> str | int | None:
    """The request's `transaction` field, echoed in the answer (Zigbee2MQTT's convention), when it is a short text
    or an integer."""
    try:
        request = _request_decoder.decode(payload) if payload else None
    except msgspec.DecodeError:
        return None
    value = request.get("transaction") if isinstance(request, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return value if isinstance(value, str) and len(value) <= 64 else None
