"""Metrics: the supervisor's state in Prometheus form, served on `[metrics] bind`:`port` from the supervisor's loop.

Nothing is counted twice: a collector reads the worker slots, the MQTT link and the outbox when Prometheus scrapes.
The HTTP endpoint runs in the selector loop rather than in prometheus_client's server thread, because the
supervisor must stay single-threaded to fork its workers safely. Per-worker memory and CPU come from /proc.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from contracts.status import WorkerState
from supervisor import statuspage
from supervisor.errors import StartupError
from supervisor.loop import Loop, TimerHandle
from supervisor.slot import LATENCY_BUCKETS, ErrorKind, RestartReason, WorkerSlot

log = logging.getLogger(__name__)

PREFIX = "supervisor_"
_REQUEST_LIMIT = 8192
_CONNECTION_SECONDS = 10.0  # a connection is closed this long after it was accepted, whatever it is doing
_MAX_CONNECTIONS = 16
_PAUSE_SECONDS = 0.5
_REPEAT_LOG_SECONDS = 60.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Observed(Protocol):
    """What the collector reads: the supervisor's state."""

    version: str
    host: str
    loop_errors: int
    resident_bytes: int

    @property
    def slots(self) -> Mapping[str, WorkerSlot]: ...

    @property
    def mqtt_connected(self) -> bool: ...

    @property
    def mqtt_counters(self) -> tuple[int, int, int, int]:
        """Reconnects, messages received, messages published, publish errors."""
        ...

    @property
    def mqtt_fast_path(self) -> tuple[int, int]:
        """PUBLISH and PUBACK packets the MQTT link parsed itself rather than through paho."""
        ...

    @property
    def outbox_backlog(self) -> int: ...

    @property
    def reloads(self) -> Mapping[str, int]:
        """Config reloads by result (ok, error)."""
        ...

    @property
    def last_reload_ok(self) -> bool | None:
        """Whether the last reload was applied; None: none was tried."""
        ...

    def status_document(self) -> Any:
        """The status document as plain values (see `contracts.status`)."""
        ...


class SupervisorCollector(Collector):
    """Every `supervisor_*` metric, from the supervisor's state at scrape time."""

    def __init__(self, observed: Observed) -> None:
        self.observed = observed
        self._cpu_before: dict[str, float] = {}  # CPU seconds of a worker's earlier processes
        self._cpu_last: dict[str, tuple[int, float]] = {}  # (pid, CPU seconds) at the last scrape

    def collect(self) -> Iterator[Metric]:
        yield from self._workers()
        yield from self._mqtt()
        outbox = GaugeMetricFamily(PREFIX + "outbox_messages", "Publications in the outbox not yet fully delivered.")
        outbox.add_metric([], self.observed.outbox_backlog)
        yield outbox
        own = GaugeMetricFamily(PREFIX + "resident_memory_bytes", "Resident memory of the supervisor process.")
        own.add_metric([], self.observed.resident_bytes)
        yield own
        reloads = CounterMetricFamily(
            PREFIX + "config_reloads", "Config reloads (SIGHUP, ctl reload, watch mode) by result.", labels=["result"]
        )
        for result, count in sorted(self.observed.reloads.items()):
            reloads.add_metric([result], count)
        yield reloads
        last = self.observed.last_reload_ok
        success = GaugeMetricFamily(
            PREFIX + "config_last_reload_successful", "0 while the config file's last reload was refused, else 1."
        )
        success.add_metric([], 0 if last is False else 1)
        yield success
        loop = CounterMetricFamily(PREFIX + "loop_errors", "Unexpected errors in the supervisor's loop, survived.")
        loop.add_metric([], self.observed.loop_errors)
        yield loop
        info = GaugeMetricFamily(
            PREFIX + "build_info", "The running version, and the host it runs on.", labels=["version", "host"]
        )
        info.add_metric([self.observed.version, self.observed.host], 1)
        yield info

    def _workers(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(PREFIX + "worker_errors", "Errors by worker and kind.", labels=["worker", "kind"])
        restarts = CounterMetricFamily(
            PREFIX + "worker_restarts", "Restarts by worker and reason.", labels=["worker", "reason"]
        )
        up = GaugeMetricFamily(PREFIX + "worker_up", "1 while the worker runs.", labels=["worker"])
        depth = GaugeMetricFamily(PREFIX + "worker_queue_depth", "Messages waiting for the worker.", labels=["worker"])
        inflight = GaugeMetricFamily(
            PREFIX + "worker_inflight_messages", "Messages handed to the worker, not yet handled.", labels=["worker"]
        )
        dead = CounterMetricFamily(PREFIX + "dead_letters", "Messages given up after crashes.", labels=["worker"])
        duplicates = CounterMetricFamily(
            PREFIX + "worker_duplicates", "Copies of publications the worker had handled, dropped.", labels=["worker"]
        )
        latency = HistogramMetricFamily(
            PREFIX + "message_handling_seconds", "Time a worker takes to handle a message.", labels=["worker"]
        )
        memory = GaugeMetricFamily(
            PREFIX + "worker_resident_memory_bytes", "Resident memory of the worker process.", labels=["worker"]
        )
        cpu = CounterMetricFamily(
            PREFIX + "worker_cpu_seconds", "CPU time of the worker's processes.", labels=["worker"]
        )
        for name, slot in self.observed.slots.items():
            # Every kind and reason is served from the start, at 0, so that rate() and alerts see the first one.
            kinds = {*ErrorKind, *slot.settings.worker_class.error_kinds, *slot.errors}
            for kind in sorted(kinds):
                errors.add_metric([name, kind], slot.errors[kind])
            for reason in sorted({*RestartReason, *slot.restarts}):
                restarts.add_metric([name, reason], slot.restarts[reason])
            up.add_metric([name], 1 if slot.state is WorkerState.RUNNING else 0)
            depth.add_metric([name], len(slot.queued))
            inflight.add_metric([name], len(slot.inflight))
            dead.add_metric([name], slot.dead_letters)
            duplicates.add_metric([name], slot.duplicates)
            latency.add_metric([name], _buckets(slot.latency_counts), slot.latency_sum)
            rss, seconds = self._usage(name, slot)
            memory.add_metric([name], rss)
            cpu.add_metric([name], seconds)
        yield from (errors, restarts, up, depth, inflight, dead, duplicates, latency, memory, cpu)

    def _mqtt(self) -> Iterator[Metric]:
        reconnects, received, published, failed = self.observed.mqtt_counters
        connected = GaugeMetricFamily(PREFIX + "mqtt_connected", "1 while connected to the broker.")
        connected.add_metric([], 1 if self.observed.mqtt_connected else 0)
        yield connected
        for name, text, value in (
            ("mqtt_reconnects", "Connections to the broker after the first.", reconnects),
            ("mqtt_messages_received", "Messages received from the broker.", received),
            ("mqtt_messages_published", "Publications handed to the broker.", published),
            ("mqtt_publish_errors", "Publications dropped or refused.", failed),
        ):
            counter = CounterMetricFamily(PREFIX + name, text)
            counter.add_metric([], value)
            yield counter
        fast = CounterMetricFamily(
            PREFIX + "mqtt_fast_path_packets",
            "Plain PUBLISH (QoS 0/1, no properties) and PUBACK packets the link parsed itself, not through paho.",
            labels=["packet"],
        )
        for packet, count in zip(("publish", "puback"), self.observed.mqtt_fast_path, strict=True):
            fast.add_metric([packet], count)
        yield fast

    def _usage(self, name: str, slot: WorkerSlot) -> tuple[int, float]:
        """Resident bytes now, and CPU seconds over all the worker's processes (earlier ones as last scraped)."""
        pid, seconds = self._cpu_last.get(name, (0, 0.0))
        process = slot.process
        current = process.pid if process is not None else 0
        if current != pid:  # a new process (or none): what the old one used so far is history
            self._cpu_before[name] = self._cpu_before.get(name, 0.0) + seconds
            self._cpu_last[name] = (current, 0.0)
        rss, now = _read_proc(current) if current else (0, 0.0)
        if current:
            self._cpu_last[name] = (current, now)
        return rss, self._cpu_before.get(name, 0.0) + now


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    cumulative = 0
    out: list[tuple[str, float]] = []
    for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], counts, strict=True):
        cumulative += count
        out.append((bound, cumulative))
    return out


def _read_proc(pid: int) -> tuple[int, float]:
    """(resident bytes, CPU seconds) of process `pid`, or zeros when it is gone."""
    try:
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_SIZE
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return 0, 0.0
    return resident, (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class MetricsServer:
    """A minimal HTTP/1.0 server for GET /metrics, on the supervisor's loop."""

    def __init__(self, loop: Loop, bind: str, port: int, observed: Observed) -> None:
        self.loop = loop
        self.registry = CollectorRegistry()
        self.registry.register(SupervisorCollector(observed))
        ProcessCollector(registry=self.registry)  # process_* of the supervisor itself: memory, CPU, descriptors
        self.observed = observed
        try:
            self.sock = socket.create_server((bind, port), reuse_port=False)
        except OSError as exc:
            where = f"{bind}:{port} ([metrics] bind, port)"
            raise StartupError(f"cannot serve metrics on {where}: {os.strerror(exc.errno or 0)}") from None
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self._connections: dict[socket.socket, TimerHandle] = {}  # open connections, oldest first
        self._last_refusal = -_REPEAT_LOG_SECONDS
        loop.add_reader(self.sock, self._accept)
        log.info("metrics on http://%s:%d/metrics", bind, self.port)

    def _accept(self) -> None:
        """Take every waiting connection. At most `_MAX_CONNECTIONS` are kept: a new one closes the oldest, so idle
        clients can never keep Prometheus out. Out of descriptors (EMFILE), accepting pauses for a moment; the
        connections wait in the listen queue meanwhile."""
        for _ in range(_MAX_CONNECTIONS):
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._pause_accepting(exc)
                return
            conn.setblocking(False)
            if len(self._connections) >= _MAX_CONNECTIONS:
                oldest = next(iter(self._connections))
                self._close(oldest)
            self._connections[conn] = self.loop.call_later(_CONNECTION_SECONDS, functools.partial(self._close, conn))
            self.loop.add_reader(conn, functools.partial(self._read, conn, bytearray()))

    def _pause_accepting(self, exc: OSError) -> None:
        now = self.loop.clock()
        if now - self._last_refusal >= _REPEAT_LOG_SECONDS:
            self._last_refusal = now
            log.warning("metrics: cannot accept a connection (%s); pausing for %g s", exc, _PAUSE_SECONDS)
        self.loop.remove_reader(self.sock)
        self.loop.call_later(_PAUSE_SECONDS, lambda: self.loop.add_reader(self.sock, self._accept))

    def _read(self, conn: socket.socket, request: bytearray) -> None:
        try:
            chunk = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        request += chunk
        if not chunk or len(request) > _REQUEST_LIMIT:
            self._close(conn)
            return
        if b"\r\n\r\n" not in request:
            return
        self.loop.remove_reader(conn)
        self._respond(conn, bytes(request.split(b"\r\n", 1)[0]))

    def _respond(self, conn: socket.socket, request_line: bytes) -> None:
        parts = request_line.split()
        path = parts[1].split(b"?")[0] if len(parts) >= 2 and parts[0] == b"GET" else None
        if path == b"/metrics":
            status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        elif path == b"/healthz":
            code, line = statuspage.health(self.observed.status_document())
            status, content_type = ("200 OK" if code == 200 else "503 Service Unavailable"), "text/plain"
            body = f"{line}\n".encode()
        elif path == b"/":
            status, content_type = "200 OK", "text/html; charset=utf-8"
            body = statuspage.page(self.observed.status_document())
        else:
            status, content_type = "404 Not Found", "text/plain"
            body = b"served here: GET /metrics, /healthz and / (a status page)\n"
        head = f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        pending = bytearray(head.encode() + body)
        self._write(conn, pending)

    def _write(self, conn: socket.socket, pending: bytearray) -> None:
        try:
            sent = conn.send(pending)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        del pending[:sent]
        if pending:
            self.loop.add_writer(conn, lambda: self._write(conn, pending))
        else:
            self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        deadline = self._connections.pop(conn, None)
        if deadline is not None:
            deadline.cancel()
        if conn.fileno() == -1:
            return
        self.loop.remove_reader(conn)
        self.loop.remove_writer(conn)
        conn.close()

    def close(self) -> None:
        for conn in list(self._connections):
            self._close(conn)
        self.loop.remove_reader(self.sock)
        self.sock.close()
