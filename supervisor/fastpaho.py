"""paho's Client made faster: every override of a private paho method, and every private paho attribute read.

The MQTT link (`supervisor.mqtt`) gets its client from `new_client` and drives it from the supervisor's loop; it
knows nothing of how the client is made fast. paho spends most of its time per message on objects and system calls
the supervisor does not need; the overrides here cut them, and `PackedProperties` lets the link hand paho PUBLISH
properties it has packed itself.

paho does not promise these names (they are not its public API). Every one of them is listed in `PAHO_METHODS` and
`PAHO_ATTRIBUTES`; `new_client` checks them against the installed paho and logs one warning naming any that
changed, and tests/test_fastpaho.py fails on the same. What a change would do: a renamed method leaves its override
unused, which is only slower, except `_packet_write` (nothing would then send what `_sock_send` queues); a renamed
attribute or a changed signature breaks the override that uses it. The client counts the packets its fast paths
took (`fast_publishes`, `fast_pubacks`, served as `supervisor_mqtt_fast_path_packets_total`), so a fast path that
paho no longer reaches shows as a counter that stays still.
"""

from __future__ import annotations

import inspect
import logging
import socket
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt import __version__ as paho_version
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

_READ_CHUNK = 64 * 1024  # see channel._READ_SIZE: a read of more than 128 KiB costs an mmap and a munmap
_DISCONNECT = 0xE0
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]

log = logging.getLogger(__name__)

# paho's private methods this module overrides (the first seven) or calls (the last three), with their parameters.
PAHO_METHODS: dict[str, tuple[str, ...]] = {
    "_packet_read": ("self",),
    "_sock_recv": ("self", "bufsize"),
    "_sock_send": ("self", "buf"),
    "_packet_write": ("self",),
    "_create_socket_connection": ("self",),
    "_handle_publish": ("self",),
    "_handle_pubackcomp": ("self", "cmd"),
    "_do_on_publish": ("self", "mid", "reason_code", "properties"),
    "_packet_handle": ("self",),
    "_easy_log": ("self", "level", "fmt", "args"),
}
CALLED = ("_do_on_publish", "_packet_handle", "_easy_log")
# The private attributes of a paho client it reads or sets (`_on_publish`: swaps out while writing;
# `_last_bytes_received`, under `_msgtime_mutex`: when a packet last came in, for the keepalive).
PAHO_ATTRIBUTES = (
    "_in_packet",
    "_protocol",
    "_on_publish",
    "_out_message_mutex",
    "_out_messages",
    "_msgtime_mutex",
    "_last_bytes_received",
)


def new_client(client_id: str, v5: bool) -> BufferedClient:
    """The link's client, checked against what this module relies on (a warning names what differs).

    MQTT 5, or 3.1.1 with a persistent session; no reconnecting of paho's own (the link reconnects from the loop);
    manual acknowledgements, which `on_plain_publish` requires: the link acknowledges a message once handled.
    """
    client = BufferedClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else False,
        reconnect_on_failure=False,
        manual_ack=True,  # see supervisor.delivery
    )
    differences = paho_differences(client)
    if differences:
        log.warning(
            "paho-mqtt %s differs from what supervisor.fastpaho relies on (%s): the MQTT link may be slower "
            "(supervisor_mqtt_fast_path_packets_total stays still) or fail; it is tested with the paho-mqtt releases "
            "that pyproject.toml allows",
            paho_version,
            "; ".join(differences),
        )
    return client


def paho_differences(client: object, client_class: type = paho.Client) -> list[str]:
    """What this module relies on that `client_class` (paho's Client) or its instance `client` lacks, one line each."""
    found = []
    for name, expected in PAHO_METHODS.items():
        method = getattr(client_class, name, None)
        if not callable(method):
            found.append(f"Client.{name} is gone")
        elif (parameters := tuple(inspect.signature(method).parameters)) != expected:
            found.append(f"Client.{name} takes ({', '.join(parameters)}), not ({', '.join(expected)})")
    found += [f"a client has no {name}" for name in PAHO_ATTRIBUTES if not hasattr(client, name)]
    return found


class BufferedClient(paho.Client):
    """paho's client with buffers in front of its socket, to cut system calls per message.

    Reading: paho reads each packet with three or more `recv` calls (command byte, length bytes, body); they are
    served from one large `recv`. Writing: paho sends each packet with its own `send`; packets are gathered and
    sent with one `send` per `loop_write`. Bytes not taken by the socket stay queued and keep `want_write` true.
    Connecting: the TCP connection is made by the supervisor's loop without blocking, then handed to paho.
    Receiving: a plain PUBLISH goes straight to `on_plain_publish` (see `_handle_publish`), and a plain PUBACK
    skips paho's decoding (see `_handle_pubackcomp`); `fast_publishes` and `fast_pubacks` count them.
    The paho privates it overrides and reads are those in `PAHO_METHODS` and `PAHO_ATTRIBUTES`.
    """

    _buffer = b""
    _position = 0
    _pending: bytearray | None = None
    _connected_socket: socket.socket | None = None
    # Called with (topic, payload, qos, retain, mid) for a plain PUBLISH. Only for a client made with
    # manual_ack=True: a QoS 1 message is then acknowledged by its owner, not here.
    on_plain_publish: Callable[[str, bytes, int, bool, int], None] | None = None
    fast_publishes = 0  # PUBLISH packets handed to on_plain_publish
    fast_pubacks = 0  # PUBACK packets confirmed without paho's decoding

    def use_connected_socket(self, sock: socket.socket) -> None:
        """Make the next `reconnect` use `sock`, connected by the supervisor's loop without blocking it."""
        self._connected_socket = sock

    def _create_socket_connection(self) -> socket.socket:
        sock, self._connected_socket = self._connected_socket, None
        if sock is None:
            return super()._create_socket_connection()
        sock.settimeout(self.connect_timeout)  # as paho's own sockets, until paho makes it non-blocking
        return sock

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._pending is None:
            self._pending = bytearray()
        if buf[:1] and buf[0] & 0xF0 == _DISCONNECT:
            self._flush()  # paho closes the socket right after a DISCONNECT: send what is queued first
            return super()._sock_send(buf)
        self._pending += buf
        return len(buf)

    def _packet_write(self) -> MQTTErrorCode:
        # paho calls on_publish for every QoS 0 packet it writes, building a ReasonCode and a Properties object
        # each time (a quarter of the supervisor's CPU in a QoS 0 flood). Nothing tracks QoS 0 completions, so the
        # callback is hidden while writing; QoS 1 and 2 confirmations arrive while reading and still reach it.
        on_publish, self._on_publish = self._on_publish, None
        try:
            rc = super()._packet_write()
        finally:
            self._on_publish = on_publish
        if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN):
            return rc
        return self._flush()

    def _flush(self) -> MQTTErrorCode:
        pending = self._pending
        while pending:
            try:
                sent = super()._sock_send(pending)
            except BlockingIOError:
                return paho.MQTT_ERR_AGAIN
            except OSError:
                return paho.MQTT_ERR_CONN_LOST
            del pending[:sent]
        return paho.MQTT_ERR_SUCCESS

    def want_write(self) -> bool:
        return super().want_write() or bool(self._pending)

    def _packet_read(self) -> MQTTErrorCode:
        # paho frames each packet through three or more `_sock_recv` calls (the command byte, each byte of the
        # length, then the body) and a dict rebuilt per packet. A packet whose whole frame is in the buffer (nearly
        # every one: the buffer is refilled 64 KiB at a time) is framed here in one step; a frame split across reads,
        # a length of more than two bytes (16 KiB and more), or a packet paho is part way through go to paho.
        if self._in_packet["command"] != 0:
            return super()._packet_read()
        if self._position >= len(self._buffer):
            try:
                data = super()._sock_recv(_READ_CHUNK)
            except BlockingIOError:
                return paho.MQTT_ERR_AGAIN
            except OSError as err:  # TimeoutError included, as in paho
                self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return paho.MQTT_ERR_CONN_LOST
            if not data:
                return paho.MQTT_ERR_CONN_LOST
            self._buffer, self._position = data, 0
        buffer, start = self._buffer, self._position
        if len(buffer) - start < 2:
            return super()._packet_read()
        length, header = buffer[start + 1], 2
        if length & 0x80:
            if len(buffer) - start < 3 or buffer[start + 2] & 0x80:
                return super()._packet_read()
            length, header = (length & 0x7F) | (buffer[start + 2] << 7), 3
        end = start + header + length
        if end > len(buffer):
            return super()._packet_read()
        self._position = end
        self._in_packet = _in_packet(buffer[start], length, bytearray(buffer[start + header : end]))
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(paho.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = paho.MQTT_ERR_PROTOCOL
        self._in_packet = _in_packet(0, 0, bytearray())
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        return rc

    def _handle_publish(self) -> MQTTErrorCode:
        # paho builds an MQTTMessage and a Properties object for every PUBLISH and takes two locks to hand it on:
        # 35 us per message here, the largest share of the supervisor's time per routed message. The common case,
        # QoS 0 or 1 with no properties and a UTF-8 topic, is parsed here (1 us) and handed straight on; anything
        # else (QoS 2, properties such as a response topic, a malformed packet) goes through paho as before.
        handler = self.on_plain_publish
        command, packet = self._in_packet["command"], self._in_packet["packet"]
        qos = (command & 0x06) >> 1
        v5 = self._protocol == paho.MQTTv5
        topic_end = 2 + int.from_bytes(packet[:2], "big")
        payload_start = topic_end + (2 if qos else 0) + (1 if v5 else 0)
        if handler is None or qos == 2 or topic_end == 2 or len(packet) < payload_start:
            return super()._handle_publish()
        if v5 and packet[payload_start - 1] != 0:
            return super()._handle_publish()  # it has properties
        try:
            topic = packet[2:topic_end].decode()
        except UnicodeDecodeError:
            return super()._handle_publish()
        mid = int.from_bytes(packet[topic_end : topic_end + 2], "big") if qos else 0
        self.fast_publishes += 1
        handler(topic, bytes(packet[payload_start:]), qos, bool(command & 0x01), mid)
        return paho.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        # A PUBACK of two bytes (the packet id alone: success, no properties) is the usual answer to each QoS 1
        # publication; paho would decode a new ReasonCode and Properties for it (10 us). It gets shared ones instead,
        # and paho's own bookkeeping (`_do_on_publish`) as before.
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        self.fast_pubacks += 1
        mid = int.from_bytes(packet, "big")
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        return paho.MQTT_ERR_SUCCESS

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._position >= len(self._buffer):
            data = super()._sock_recv(_READ_CHUNK)  # raises BlockingIOError when nothing is there
            if not data:
                return data
            self._buffer, self._position = data, 0
        start = self._position
        self._position = start + bufsize
        return self._buffer[start : start + bufsize]

    @property
    def buffered(self) -> bool:
        """Bytes already read from the socket that paho has not consumed yet."""
        return self._position < len(self._buffer)

    def unconfirmed(self) -> list[paho.MQTTMessage]:
        """The QoS 1 and 2 publications the broker has not confirmed yet, oldest first."""
        with self._out_message_mutex:
            return [message for message in self._out_messages.values() if message.qos > 0]

    def refuse_unconfirmed(self, chosen: Callable[[paho.MQTTMessage], bool], reason: ReasonCode) -> int:
        """Give up the unconfirmed QoS 1/2 publications `chosen` picks, as if the broker had refused them (paho would
        send them again on every connection); returns how many."""
        with self._out_message_mutex:
            mids = [mid for mid, message in self._out_messages.items() if message.qos > 0 and chosen(message)]
            for mid in mids:
                self._do_on_publish(mid, reason, _NO_PROPERTIES)
        return len(mids)

    def drop_buffers(self) -> None:
        """Forget what was read or queued on the previous connection."""
        self._buffer, self._position = b"", 0
        self._pending = bytearray()


class PackedProperties(Properties):
    """PUBLISH properties packed by the link once (paho's own `pack` looks up every property name on each call).
    paho only calls `pack` on them: when it sends the packet, and again if it resends it after a reconnect."""

    _packed: bytes

    def __init__(self, packed: bytes) -> None:  # not Properties.__init__: nothing but `pack` is ever used
        self.__dict__["_packed"] = packed  # Properties.__setattr__ only admits MQTT property names

    def pack(self) -> bytes:
        return self._packed

    def __repr__(self) -> str:
        return f"PackedProperties({self._packed!r})"

    __str__ = __repr__


def _in_packet(command: int, length: int, packet: bytearray) -> Any:  # paho's private _InPacket
    """paho's record of the packet being read: a whole one (`command` not 0), or none yet."""
    return {
        "command": command,
        "have_remaining": 1 if command else 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": length,
        "packet": packet,
        "to_process": 0,
        "pos": 0,
    }
