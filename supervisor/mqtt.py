"""The MQTT link: the supervisor's one connection to the broker, its lifecycle, and the only user of paho's API.

paho is driven from the supervisor's selector loop (`loop_read` / `loop_write` / `loop_misc`, no paho thread), so
every paho callback runs on the loop's thread. The callbacks only translate paho's objects into our own types and
hand them to the `LinkListener`. Reconnecting is ours too: exponential backoff between the configured minimum and
maximum, and on every connect the link publishes the birth message and subscribes to every filter again.
The link uses paho's public API only; what makes its client fast (overrides of paho's private methods) is in
`supervisor.fastpaho`, the one other module that imports paho.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from contracts.topics import publish_topic_problem
from supervisor import secrets
from supervisor.config import MqttConfig
from supervisor.fastpaho import BufferedClient, PackedProperties, new_client
from supervisor.loop import Loop, TimerHandle
from supervisor.secrets import Secret

log = logging.getLogger(__name__)

# paho's loop_misc (keepalive pings, a missing ping response): at least four times per keepalive, every 10 s at most,
# on a period that divides 10 s: an idle link wakes no more often, in step with the supervisor's other periodic tasks
# (`Loop.call_later`).
_MISC_PERIODS = (10.0, 5.0, 2.5, 2.0, 1.0, 0.5)
_MAX_READS_PER_WAKEUP = 10_000
_REPEAT_LOG_SECONDS = 60.0
_STABLE_CONNECTION_SECONDS = 10.0
_FAST_RETRY_SECONDS = 0.02  # a refused connection soon after the link went down: retried this soon
_FAST_RETRY_WINDOW_SECONDS = 10.0
_PACKET_TOO_LARGE = ReasonCode(PacketTypes.DISCONNECT, "Packet too large")
# The MQTT 5 user property that carries every publication's stable id (identifier 0x26, then the key).
PUBLICATION_ID_KEY = "publication-id"
_PUBLICATION_ID_PROPERTY = b"\x26" + len(PUBLICATION_ID_KEY).to_bytes(2, "big") + PUBLICATION_ID_KEY.encode()


def _publish_properties(expiry: int | None, correlation_data: bytes | None, publication_id: str) -> Properties:
    """MQTT 5 PUBLISH properties: message expiry, correlation data, and the publication id as a user property."""
    identifier = publication_id.encode()
    parts = [_expiry_property(expiry) if expiry else b""]
    if correlation_data is not None:
        parts.append(b"\x09" + len(correlation_data).to_bytes(2, "big") + correlation_data)
    parts += (_PUBLICATION_ID_PROPERTY, len(identifier).to_bytes(2, "big"), identifier)
    body = b"".join(parts)
    size = len(body)
    return PackedProperties((bytes((size,)) if size < 128 else _variable_byte_integer(size)) + body)


@functools.lru_cache(maxsize=64)
def _expiry_property(seconds: int) -> bytes:
    return b"\x02" + seconds.to_bytes(4, "big")


def _variable_byte_integer(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


class Incoming(msgspec.Struct, frozen=True, kw_only=True):
    """A message from the broker, in our terms. `mid` is the broker's packet id (0 for QoS 0)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_ids: tuple[int, ...] = ()  # MQTT 5: which of our subscriptions this copy is for
    publication_id: str | None = None  # MQTT 5: the publisher's `publication-id` user property


class LinkListener(Protocol):
    def link_connected(self, session_present: bool) -> None: ...

    def link_disconnected(self, reason: str) -> None: ...

    def message_received(self, message: Incoming) -> None: ...

    def publish_confirmed(self, mid: int, failure: str | None) -> None: ...

    def bad_message(self, reason: str) -> None: ...


class MqttLink:
    """One paho client, its socket in the loop, reconnects with backoff, will and birth."""

    def __init__(self, config: MqttConfig, password: Secret | None, loop: Loop, listener: LinkListener) -> None:
        self.config = config
        self.loop = loop
        self.listener = listener
        self.connected = False
        self.reconnects = 0
        self.publish_errors = 0
        self.received = 0  # messages from the broker
        self.published = 0  # publications handed to the broker
        self._born = False  # birth published on this connection
        self._stopping = False
        self._ever_connected = False
        self._connected_at = 0.0
        self._v5 = config.protocol == 5
        self.max_packet_size: int | None = None  # MQTT 5: what the broker said it takes, on this connection
        self._id_prefix = os.urandom(6).hex()  # this run's: ids stay unique across restarts and supervisors
        self._id_count = itertools.count(1)
        self._client = self._build_client(password)
        self._subscriptions = _Subscriptions(self._client, self._v5)
        self._connector = _Connector(config, loop, self._client, lambda: self.connected)
        quarter = config.keepalive_seconds / 4
        self._misc_interval = next((period for period in _MISC_PERIODS if period <= quarter), quarter)

    # Public API ---------------------------------------------------------------------------------------------------

    def subscribe(
        self, filters: list[tuple[str, int, int]], with_ids: bool, retained_again: frozenset[str] = frozenset()
    ) -> None:
        """Set the (filter, qos, subscription id) subscriptions made on every connect; while connected, change the
        live ones to match: SUBSCRIBE for a filter new or changed, then UNSUBSCRIBE for one no longer wanted (in
        that order, so that a topic a wider filter takes over is never without one). Under MQTT 5 a live
        SUBSCRIBE of a filter the broker has already asks for no retained messages (Retain Handling 1), except for
        the filters in `retained_again`, which are subscribed again with them (a worker added to a filter that
        others had: see `Routing`). While disconnected, the filters dropped are unsubscribed at the next connect
        (the broker's session keeps them).

        Under MQTT 5 the filters are subscribed with No Local (except shared subscriptions), each with its
        subscription id when `with_ids`; under 3.1.1 the ids are never sent.
        """
        subscriptions = self._subscriptions
        before = {f: (qos, sub_id if subscriptions.with_ids else 0) for f, qos, sub_id in subscriptions.filters}
        ids_changed = with_ids != subscriptions.with_ids
        subscriptions.filters = list(filters)
        subscriptions.with_ids = with_ids
        wanted = {f for f, _, _ in filters}
        dropped = [f for f in before if f not in wanted]
        if not self.connected:
            subscriptions.stale = (subscriptions.stale | set(dropped)) - wanted
            return
        changed = [
            (f, q, i)
            for f, q, i in filters
            if ids_changed or f in retained_again or before.get(f) != (q, i if with_ids else 0)
        ]
        subscriptions.send(changed, live={f for f, _, _ in changed if f in before} - retained_again)
        subscriptions.unsubscribe(dropped)

    def start(self) -> None:
        """Connect now, and keep reconnecting until `stop`. The owner calls `flush` at the end of every wake-up."""
        self.loop.call_later(self._misc_interval, self._misc, aligned=True)
        self._connector.connect()

    def size_problem(self, topic: str, payload: bytes) -> str | None:
        """Why a publication is too large for the broker (which would drop the connection for it), or None."""
        limit = self.max_packet_size
        if limit is None:
            return None
        size = _packet_size(len(topic.encode(errors="surrogatepass")), len(payload))
        return f"{size} bytes, more than the broker's maximum packet size ({limit})" if size > limit else None

    def new_publication_id(self) -> str:
        """A new stable id for a publication: unique across runs and supervisors, kept with it in the outbox."""
        return f"{self._id_prefix}-{next(self._id_count):x}"

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        expiry: int | None = None,
        correlation_data: bytes | None = None,
        publication_id: str | None = None,
    ) -> int | None:
        """Queue a publication; its packet id (confirmed later through `publish_confirmed` for QoS 1 and 2), or
        None when it was dropped (counted in `publish_errors`).

        Under MQTT 5 it carries `publication_id` (a new one when None) as the user property `publication-id`;
        MQTT 3.1.1 has no properties, so there it carries none. QoS 0 while disconnected is dropped; QoS 1 and 2
        wait in paho's queue for the next connection.
        """
        if qos == 0 and not self.connected:
            self.publish_errors += 1
            return None
        problem = publish_topic_problem(topic) or self.size_problem(topic, payload)
        if problem is not None:  # paho would raise, or the broker would drop the connection for it
            self.publish_errors += 1
            log.warning("refused to publish: %s", problem)
            return None
        properties = None
        if self._v5:
            properties = _publish_properties(expiry, correlation_data, publication_id or self.new_publication_id())
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            self.publish_errors += 1
            log.warning("publish to %s failed: %s", topic, paho.error_string(info.rc))
            return None
        self.published += 1
        return info.mid

    @property
    def fast_path_packets(self) -> tuple[int, int]:
        """PUBLISH and PUBACK packets the client parsed itself rather than through paho (see supervisor.fastpaho)."""
        return self._client.fast_publishes, self._client.fast_pubacks

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge inbound message `mid` (QoS 1 or 2) to the broker."""
        self._client.ack(mid, qos)

    def stop(self, timeout: float = 2.0) -> None:
        """Publish the will payload ourselves (a clean disconnect suppresses the will), then disconnect."""
        self._stopping = True
        self._connector.stop()
        if not self.connected:
            self._client.disconnect()
            return
        info = self._client.publish(
            self.config.availability_topic, self.config.will_payload.encode(), qos=1, retain=True
        )
        deadline = self.loop.clock() + timeout
        while self.connected and not info.is_published() and self.loop.clock() < deadline:
            self.loop.run_once(max_wait=0.05)
        self._client.disconnect()
        while self._client.want_write() and self.loop.clock() < deadline:
            self.loop.run_once(max_wait=0.05)

    # Connecting ---------------------------------------------------------------------------------------------------

    def _build_client(self, password: Secret | None) -> BufferedClient:
        config = self.config
        client = new_client(config.client_id, self._v5)
        client.max_queued_messages_set(0)  # QoS >= 1 publications are all kept (and in the outbox on disk)
        client.connect_timeout = config.connect_timeout_seconds
        if config.username:
            client.username_pw_set(config.username, password.reveal() if password else None)
            secrets.on_fork_child(lambda: client.username_pw_set(None))  # a forked worker forgets paho's copy
        if config.tls.enabled:
            client.tls_set(ca_certs=config.tls.ca_file, certfile=config.tls.cert_file, keyfile=config.tls.key_file)
            client.tls_insecure_set(config.tls.insecure)
        client.will_set(config.availability_topic, config.will_payload.encode(), qos=1, retain=True)
        properties = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = config.session_expiry_seconds
            properties.ReceiveMaximum = config.receive_maximum
        # clean_start=False: keep the broker's session (and its queued QoS 1 messages) across restarts.
        client.connect_async(
            config.host,
            config.port,
            keepalive=config.keepalive_seconds,
            clean_start=False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        # Writing is ours (see flush); these being set keeps paho from sending inside every publish() call.
        client.on_socket_register_write = _ignore
        client.on_socket_unregister_write = _ignore
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_plain_publish = self._on_plain_publish
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    # Driving paho from the loop -----------------------------------------------------------------------------------

    def _readable(self) -> None:
        """Read and handle every packet that has arrived, including all that the read buffer already holds.

        The buffer must be empty on return: the selector only reports bytes still in the kernel.
        """
        client = self._client
        sock = client.socket()
        for _ in range(_MAX_READS_PER_WAKEUP):
            if client.loop_read() != paho.MQTT_ERR_SUCCESS or sock is not client.socket() or not client.buffered:
                return

    def flush(self) -> None:
        """Send everything paho has queued (one `send` for all of it); the owner calls this once per wake-up."""
        if self._client.want_write():
            self._client.loop_write()
            self._watch_writable()

    def _writable(self) -> None:
        self._client.loop_write()
        self._watch_writable()

    def _watch_writable(self) -> None:
        """Ask the selector for writability only while the socket has not taken everything."""
        sock = self._client.socket()
        if sock is None:
            return
        if self._client.want_write():
            self.loop.add_writer(sock, self._writable)
        else:
            self.loop.remove_writer(sock)

    def _misc(self) -> None:
        if self.connected and self.loop.clock() - self._connected_at >= _STABLE_CONNECTION_SECONDS:
            self._connector.stable()
        self._client.loop_misc()
        self.loop.call_later(self._misc_interval, self._misc, aligned=True)

    def _forget_socket(self, sock: Any) -> None:
        self.loop.remove_reader(sock)
        self.loop.remove_writer(sock)

    # paho callbacks: translate and hand over ---------------------------------------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._client.drop_buffers()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # paho leaves Nagle on: ms per round trip
        self.loop.add_reader(sock, self._readable)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._forget_socket(sock)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        self._connector.cancel_deadline()
        if reason.is_failure:
            self._connector.problem(f"the broker at {self._connector.where} refused the connection: {reason}")
            return  # the broker closes the connection; _on_disconnect schedules the retry
        log.log(
            logging.DEBUG if self._connector.quiet else logging.INFO,
            "connected to %s:%d (session present: %s)",
            self.config.host,
            self.config.port,
            flags.session_present,
        )
        self.connected = True
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        self._connected_at = self.loop.clock()
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self._connector.up()
        self._born = False
        self._subscriptions.unacknowledged.clear()
        waiting = self._subscriptions.send(self._subscriptions.filters)
        self._subscriptions.unsubscribe(sorted(self._subscriptions.stale))
        self._subscriptions.stale.clear()
        if not waiting:
            self._publish_birth()  # else once the broker has acknowledged every subscription
        self.listener.link_connected(flags.session_present)

    def _publish_birth(self) -> None:
        """`online` on the availability topic: published when the subscriptions are in place, so it means ready."""
        if self._born:
            return
        self._born = True
        self._client.publish(self.config.availability_topic, self.config.birth_payload.encode(), qos=1, retain=True)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        was_connected, self.connected = self.connected, False
        if reason == _PACKET_TOO_LARGE:  # after this callback: paho holds its callback lock until it returns
            self.loop.call_later(0, self._refuse_oversized)
        if was_connected:
            if not self._stopping:
                text = f"disconnected from the broker: {reason}"
                if self.loop.clock() - self._connected_at < _STABLE_CONNECTION_SECONDS:
                    text += f" soon after connecting (is another client using client id {self.config.client_id!r}?)"
                self._connector.problem(text)
            self.listener.link_disconnected(str(reason))
        self._connector.schedule()

    def _refuse_oversized(self) -> None:
        """The broker dropped the connection for a packet too large: give up the publications that cannot be it,
        or else it happens again on every connection (paho sends unconfirmed publications again)."""
        limit = self.max_packet_size
        largest = max((len(message.payload) for message in self._client.unconfirmed()), default=-1)

        def chosen(message: paho.MQTTMessage) -> bool:
            if limit is not None:  # paho encoded the topic from a str: it decodes back to the same bytes
                return _packet_size(len(message.topic.encode()), len(message.payload)) > limit
            return len(message.payload) == largest  # the broker named no limit: the largest is the likeliest

        refused = self._client.refuse_unconfirmed(chosen, _PACKET_TOO_LARGE)
        if refused:
            log.error("the broker dropped the connection for a packet too large; gave up %d publication(s)", refused)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        if self._subscriptions.acknowledged(mid, reasons):
            self._publish_birth()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        failure = str(reason) if reason.is_failure else None
        if failure is not None:
            self.publish_errors += 1
        self.listener.publish_confirmed(mid, failure)

    def _on_plain_publish(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        self.received += 1
        self.listener.message_received(Incoming(topic=topic, payload=payload, qos=qos, retain=retain, mid=mid))

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        """A PUBLISH that paho decoded: one with properties (MQTT 5), at QoS 2, or with a topic that is not UTF-8."""
        self.received += 1
        try:
            incoming = _incoming(msg)
        except UnicodeDecodeError:
            self.listener.bad_message("topic is not valid UTF-8")
            return
        self.listener.message_received(incoming)


def _incoming(msg: paho.MQTTMessage) -> Incoming:
    """A message paho decoded, as ours; raises UnicodeDecodeError for a topic that is not UTF-8."""
    topic = msg.topic
    properties = msg.properties
    if properties is None:  # MQTT 3.1.1 at QoS 2
        return Incoming(topic=topic, payload=bytes(msg.payload), qos=msg.qos, retain=msg.retain, mid=msg.mid)
    correlation = getattr(properties, "CorrelationData", None)
    user = getattr(properties, "UserProperty", ())
    publication_id = next((value for key, value in user if key == PUBLICATION_ID_KEY), None)
    return Incoming(
        topic=topic,
        payload=bytes(msg.payload),
        qos=msg.qos,
        retain=msg.retain,
        mid=msg.mid,
        response_topic=getattr(properties, "ResponseTopic", None),
        correlation_data=bytes(correlation) if correlation is not None else None,
        subscription_ids=tuple(getattr(properties, "SubscriptionIdentifier", ())),
        publication_id=publication_id if isinstance(publication_id, str) else None,
    )


class _Subscriptions:
    """The link's subscriptions: the filters subscribed on every connect, and the SUBSCRIBE packets the broker has
    not acknowledged yet (the birth waits for them)."""

    def __init__(self, client: BufferedClient, v5: bool) -> None:
        self.client = client
        self.v5 = v5
        self.filters: list[tuple[str, int, int]] = []  # (filter, qos, subscription id)
        self.with_ids = False
        self.unacknowledged: dict[int, list[str]] = {}  # SUBSCRIBE packet id -> its filters
        self.stale: set[str] = set()  # dropped while disconnected: unsubscribed at the next connect

    def send(self, subscriptions: list[tuple[str, int, int]], live: set[str] | None = None) -> bool:
        """Send SUBSCRIBE packets for `subscriptions`; whether any is now waiting for the broker's answer. Under
        MQTT 5 the filters in `live` (the broker has them already) ask for no retained messages."""
        if not self.v5:
            if subscriptions:
                filters = [f for f, _, _ in subscriptions]
                self._track(filters, self.client.subscribe([(f, qos) for f, qos, _ in subscriptions]))
            return bool(self.unacknowledged)
        for topic_filter, qos, sub_id in subscriptions:
            properties = None
            if self.with_ids:
                properties = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
                properties.SubscriptionIdentifier = sub_id
            options = SubscribeOptions(
                qos=qos,
                noLocal=not topic_filter.startswith("$share/"),
                retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB if live and topic_filter in live else 0,
            )
            self._track([topic_filter], self.client.subscribe(topic_filter, options=options, properties=properties))
        return bool(self.unacknowledged)

    def unsubscribe(self, filters: list[str]) -> None:
        if filters:
            rc, _ = self.client.unsubscribe(filters)
            if rc != paho.MQTT_ERR_SUCCESS:
                log.warning("unsubscribing from %s failed: %s", ", ".join(filters), paho.error_string(rc))
            else:
                log.info("unsubscribed from %s", ", ".join(filters))

    def acknowledged(self, mid: int, reasons: list[ReasonCode]) -> bool:
        """The broker answered SUBSCRIBE `mid`; True when that was the last one it owed."""
        filters = self.unacknowledged.pop(mid, [])
        for topic_filter, reason in zip(filters, reasons, strict=False):
            if reason.is_failure:
                log.warning("the broker refused the subscription to %s: %s", topic_filter, reason)
        if filters and not self.unacknowledged:
            log.info("subscribed to %d topic filter(s)", len(self.filters))
            return True
        return False

    def _track(self, filters: list[str], result: tuple[int, int | None]) -> None:
        rc, mid = result
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            log.warning("subscribing to %s failed: %s", ", ".join(filters), paho.error_string(rc))
            return
        self.unacknowledged[mid] = filters


class _Connector:
    """Connecting without blocking the loop: a TCP connection made in the loop, then paho's CONNECT over it, each
    with a deadline; retries with exponential backoff (a refused connection at the shortest interval); each
    connection problem logged when new, then at most once a minute."""

    def __init__(self, config: MqttConfig, loop: Loop, client: BufferedClient, connected: Callable[[], bool]) -> None:
        self.config = config
        self.loop = loop
        self.client = client
        self.connected = connected
        self.stopping = False
        self.quiet = False  # the last problem was a repeat, logged at debug level only
        self._delay = config.reconnect_min_seconds
        self._retry: TimerHandle | None = None
        self._connect_deadline: TimerHandle | None = None
        self._connecting: socket.socket | None = None  # a TCP connection under way
        self._last_problem: tuple[str, float] | None = None
        self._down_since: float | None = None  # when the link went down (None: up, or never connected yet)

    def up(self) -> None:
        """The broker accepted the connection: the next retry waits the shortest time again."""
        self.cancel_deadline()
        self._delay = self.config.reconnect_min_seconds
        self._down_since = None

    def stable(self) -> None:
        """The connection has stayed up a while: the last problem is over."""
        self._last_problem = None

    def stop(self) -> None:
        """No more connecting: cancel what is scheduled, and drop a TCP connection under way."""
        self.stopping = True
        for timer in (self._retry, self._connect_deadline):
            if timer is not None:
                timer.cancel()
        if self._connecting is not None:
            self.loop.remove_reader(self._connecting)
            self.loop.remove_writer(self._connecting)
            self._connecting.close()

    def connect(self) -> None:
        """Start a TCP connection without blocking the loop; `_tcp_connected` takes over when it is made."""
        self._retry = None
        if self.stopping:
            return
        try:
            family, kind, protocol, _, address = socket.getaddrinfo(
                self.config.host, self.config.port, type=socket.SOCK_STREAM
            )[0]
            sock = socket.socket(family, kind, protocol)
        except OSError as exc:
            self.problem(f"cannot reach the broker at {self.where}: {exc}")
            self.schedule()
            return
        sock.setblocking(False)
        error = sock.connect_ex(address)
        if error not in (0, errno.EINPROGRESS):
            sock.close()
            self._unreachable(error)
            return
        self._connecting = sock
        self.loop.add_writer(sock, self._tcp_connected)
        self._connect_deadline = self.loop.call_later(self.config.connect_timeout_seconds, self._connect_timed_out)

    def _tcp_connected(self) -> None:
        sock, self._connecting = self._connecting, None
        assert sock is not None
        self.loop.remove_writer(sock)
        self.cancel_deadline()
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            sock.close()
            self._unreachable(error)
            return
        self.client.use_connected_socket(sock)
        try:
            self.client.reconnect()  # TLS handshake (if any) and CONNECT on the socket just made
        except (OSError, ssl.SSLError) as exc:
            self.problem(f"cannot reach the broker at {self.where}: {exc}")
            self.schedule()
            return
        self._connect_deadline = self.loop.call_later(self.config.keepalive_seconds, self._connect_timed_out)

    def _unreachable(self, error: int) -> None:
        self.problem(f"cannot reach the broker at {self.where}: {os.strerror(error)}")
        # A refused connection (the broker is restarting, or the port is closed) costs a SYN and a RST: retry it at
        # the shortest interval, so the supervisor is back within reconnect_min_seconds of the broker.
        self.schedule(backoff=error != errno.ECONNREFUSED)

    def _connect_timed_out(self) -> None:
        self._connect_deadline = None
        if self._connecting is not None:
            self.loop.remove_reader(self._connecting)
            self.loop.remove_writer(self._connecting)
            self._connecting.close()
            self._connecting = None
            self.problem(
                f"the broker at {self.where} did not accept a connection within "
                f"{self.config.connect_timeout_seconds:g} s"
            )
        elif not self.connected():
            self.problem(f"the broker at {self.where} did not answer CONNECT")
        self.schedule()  # reconnect() closes a silent paho socket first

    def cancel_deadline(self) -> None:
        if self._connect_deadline is not None:
            self._connect_deadline.cancel()
            self._connect_deadline = None

    def schedule(self, backoff: bool = True) -> None:
        """Connect again later: after a refused connection (no `backoff`: the broker is restarting, or down) every
        20 ms for the first 10 s after the link went down, so that it flows again within tens of milliseconds of
        the broker's return, then every `reconnect_min_seconds`; after any other failure, with exponential backoff."""
        if self.stopping or self._retry is not None:
            return
        now = self.loop.clock()
        if self._down_since is None:
            self._down_since = now
        delay = self._delay if backoff else self.config.reconnect_min_seconds
        if not backoff and now - self._down_since < _FAST_RETRY_WINDOW_SECONDS:
            delay = min(delay, _FAST_RETRY_SECONDS)
        if backoff:
            self._delay = min(self._delay * 2, self.config.reconnect_max_seconds)
        self._retry = self.loop.call_later(delay, self.connect)

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def problem(self, text: str) -> None:
        """Log a connection problem: at once when it is new, then at most once a minute while it lasts.

        The problem counts as over once a connection has stayed up for a while (`stable`).
        """
        now = self.loop.clock()
        self.quiet = False
        if self._last_problem is None or self._last_problem[0] != text:
            log.warning(
                "%s; retrying every %g-%g s",
                text,
                self.config.reconnect_min_seconds,
                self.config.reconnect_max_seconds,
            )
        elif now - self._last_problem[1] < _REPEAT_LOG_SECONDS:
            log.debug("%s", text)
            self.quiet = True
            return
        else:
            log.warning("still: %s", text)
        self._last_problem = (text, now)


def _packet_size(topic_bytes: int, payload_bytes: int) -> int:
    """An upper bound of the size of a PUBLISH packet (a properties block of up to 128 bytes included)."""
    return 1 + 4 + 2 + topic_bytes + 2 + 128 + payload_bytes


def _ignore(client: paho.Client, userdata: Any, sock: Any) -> None:
    """paho's write-interest callbacks: the link decides about writing itself."""


def request(
    config: MqttConfig,
    password: Secret | None,
    topic: str,
    payload: bytes,
    answer_topic: str,
    is_answer: Callable[[bytes], bool],
    timeout: float,
) -> bytes | None:
    """One request to the running supervisor and its answer, for the command line (`supervisor.ctl`); None when
    no answer came within `timeout` seconds. Raises OSError when the broker cannot be reached.

    A client of its own, never the supervisor's client id (the broker would disconnect the supervisor): that id plus
    `-ctl-<random>`, with a clean session. Under MQTT 5 the answer is the message on `answer_topic` with this
    request's correlation data; under 3.1.1 (no correlation data) the one on `answer_topic` that `is_answer` takes.
    """
    v5 = config.protocol == 5
    client = _command_line_client(config, password)
    correlation = os.urandom(8)
    answers: list[bytes] = []
    subscribed: list[int] = []

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        ours = getattr(msg.properties, "CorrelationData", None) == correlation if v5 else is_answer(bytes(msg.payload))
        if ours:
            answers.append(bytes(msg.payload))

    client.on_message = on_message
    client.on_subscribe = lambda client, userdata, mid, reasons, properties: subscribed.append(mid)
    client.connect(config.host, config.port, keepalive=config.keepalive_seconds)
    deadline = time.monotonic() + timeout
    try:
        client.subscribe(answer_topic, qos=1)
        while not subscribed and time.monotonic() < deadline:
            client.loop(timeout=0.05)
        properties = None
        if v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ResponseTopic = answer_topic
            properties.CorrelationData = correlation
        client.publish(topic, payload, qos=1, properties=properties)
        while not answers and time.monotonic() < deadline:
            client.loop(timeout=0.05)
    finally:
        client.disconnect()
    return answers[0] if answers else None


def follow(config: MqttConfig, password: Secret | None, topic_filter: str) -> Iterator[bytes]:
    """The payloads of the messages on `topic_filter` as they come, for the command line (`ctl tail`), until the
    caller stops iterating. Raises OSError when the broker cannot be reached or the connection is lost."""
    client = _command_line_client(config, password)
    payloads: list[bytes] = []
    lost: list[str] = []
    client.on_message = lambda client, userdata, msg: payloads.append(bytes(msg.payload))
    client.on_disconnect = lambda client, userdata, flags, reason, properties: lost.append(str(reason))
    client.connect(config.host, config.port, keepalive=config.keepalive_seconds)
    try:
        client.subscribe(topic_filter, qos=0)
        while not lost:
            rc = client.loop(timeout=0.2)
            if rc != paho.MQTT_ERR_SUCCESS:
                lost.append(paho.error_string(rc))
            while payloads:
                yield payloads.pop(0)
        raise OSError(f"the connection to the broker was lost: {lost[0]}")
    finally:
        client.disconnect()


def _command_line_client(config: MqttConfig, password: Secret | None) -> paho.Client:
    """A client of its own for the command line, never the supervisor's client id (the broker would disconnect the
    supervisor): that id plus `-ctl-<random>`, with a clean session."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{config.client_id}-ctl-{os.urandom(4).hex()}",
        protocol=paho.MQTTv5 if config.protocol == 5 else paho.MQTTv311,
        reconnect_on_failure=False,
    )
    if config.username:
        client.username_pw_set(config.username, password.reveal() if password else None)
    if config.tls.enabled:
        client.tls_set(ca_certs=config.tls.ca_file, certfile=config.tls.cert_file, keyfile=config.tls.key_file)
        client.tls_insecure_set(config.tls.insecure)
    return client
