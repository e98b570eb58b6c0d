"""A minimal MQTT 5 load generator on raw sockets: pre-encoded packets, one thread, batched sends.

The benchmark's driver must not be what limits the systems it measures; a paho client with its loop thread spends
most of a core on its own bookkeeping. This speaks just enough MQTT 5 (CONNECT, SUBSCRIBE, PUBLISH at QoS 0/1,
PUBACK) to publish numbered messages and time their echoes.
"""

from __future__ import annotations

import select
import socket
import struct
import time
import uuid

_STAMP = struct.Struct("<QQ")  # sequence number, send time (ns)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + _varint(len(body)) + body


class RawClient:
    """One MQTT 5 connection on a blocking-then-non-blocking socket."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        client_id = f"raw-{uuid.uuid4().hex[:10]}"
        variable = _string("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 60) + b"\x00"
        self.sock.sendall(_packet(0x10, variable + _string(client_id)))
        header, body = self._read_one()
        if header >> 4 != 2 or body[1] != 0:
            raise ConnectionError(f"CONNACK refused: {bytes(body)!r}")

    def _read_one(self) -> tuple[int, bytes]:
        """The next packet's first byte (type and flags) and body, blocking until it is there."""
        while True:
            parsed = self._parse_one()
            if parsed is not None:
                return parsed
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buffer += chunk

    def _parse_one(self) -> tuple[int, bytes] | None:
        buffer = self.buffer
        multiplier, length, index = 1, 0, 1
        while True:
            if index >= len(buffer):
                return None
            byte = buffer[index]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            index += 1
            if not byte & 0x80:
                break
        if len(buffer) < index + length:
            return None
        header, body = buffer[0], bytes(buffer[index : index + length])
        del buffer[: index + length]
        return header, body

    def subscribe(self, topic_filter: str, qos: int) -> None:
        body = struct.pack("!H", 1) + b"\x00" + _string(topic_filter) + bytes([qos])
        self.sock.sendall(_packet(0x82, body))
        while self._read_one()[0] >> 4 != 9:
            pass
        self.sock.setblocking(False)

    def close(self) -> None:
        try:
            self.sock.setblocking(True)
            self.sock.sendall(b"\xe0\x00")
        except OSError:
            pass
        self.sock.close()


def publish_packet(topic: str, sequence: int, qos: int, size: int, packet_id: int) -> bytes:
    payload = _STAMP.pack(sequence, time.perf_counter_ns()).ljust(size, b".")
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + b"\x00" + payload
    return _packet(0x30 | (qos << 1), body)


class LoadGen:
    """A publisher and a subscriber connection driven by one loop; records (sequence, sent ns, arrived ns)."""

    def __init__(self, port: int, subscribe: str) -> None:
        self.publisher = RawClient(port)
        self.publisher.sock.setblocking(False)
        self.subscriber = RawClient(port)
        self.subscriber.subscribe(subscribe, 1)
        self.sent_at: dict[int, int] = {}

    def close(self) -> None:
        self.publisher.close()
        self.subscriber.close()

    def run(
        self,
        topics: list[str],
        qos: int,
        messages: int,
        *,
        echoes_per_message: int = 1,
        window: int = 500,
        rate: float | None = None,
        size: int = 150,
        timeout: float = 60.0,
        quiet_seconds: float = 1.0,
        first_only: bool = False,
    ) -> list[tuple[int, int, int]]:
        """Publish `messages` (at most `window` echoes outstanding, or paced at `rate`/s); return the arrivals.

        Ends when every expected echo has arrived, nothing has arrived for `quiet_seconds` after the last send,
        `timeout` passes, or (with `first_only`) the first echo arrives.
        """
        expected = messages * echoes_per_message
        arrivals: list[tuple[int, int, int]] = []
        sent_at: dict[int, int] = {}
        sent = 0
        started = time.monotonic()
        last_progress = started
        packet_id = 0
        pub, sub = self.publisher, self.subscriber
        while len(arrivals) < expected:
            now = time.monotonic()
            if now - started > timeout or (sent == messages and now - last_progress > quiet_seconds):
                break
            if rate is None:
                room = min(
                    messages - sent, (window - (sent * echoes_per_message - len(arrivals))) // echoes_per_message
                )
            else:
                room = min(messages - sent, int((now - started) * rate) + 1 - sent)
            if room > 0:
                batch = bytearray()
                for _ in range(room):
                    packet_id = packet_id % 65535 + 1
                    batch += publish_packet(topics[sent % len(topics)], sent, qos, size, packet_id)
                    sent_at[sent] = time.perf_counter_ns()
                    sent += 1
                pub.sock.setblocking(True)
                pub.sock.sendall(batch)
                pub.sock.setblocking(False)
                last_progress = time.monotonic()
            wait = 0.05 if rate is None else max(0.0, started + sent / rate - time.monotonic())
            readable, _, _ = select.select([pub.sock, sub.sock], [], [], min(wait, 0.05))
            if pub.sock in readable:
                self._drain_acks(pub)
            if sub.sock in readable and self._receive(sub, sent_at, arrivals):
                last_progress = time.monotonic()
                if first_only and arrivals:
                    break
        self.sent_at = sent_at
        return arrivals

    def _drain_acks(self, client: RawClient) -> None:
        try:
            while chunk := client.sock.recv(262144):
                client.buffer += chunk
        except BlockingIOError:
            pass
        while client._parse_one() is not None:
            pass

    def _receive(self, client: RawClient, sent_at: dict[int, int], arrivals: list[tuple[int, int, int]]) -> bool:
        try:
            while chunk := client.sock.recv(262144):
                client.buffer += chunk
                if len(chunk) < 262144:
                    break
        except BlockingIOError:
            pass
        now = time.perf_counter_ns()
        acks = bytearray()
        got = False
        while (parsed := client._parse_one()) is not None:
            header, body = parsed
            if header >> 4 != 3:  # only PUBLISH matters here
                continue
            position = 2 + struct.unpack_from("!H", body)[0]  # past the topic
            if (header >> 1) & 3:  # QoS 1: acknowledge the packet id
                acks += b"\x40\x02" + body[position : position + 2]
                position += 2
            properties_length, used = _read_varint(body, position)
            sequence, _ = _STAMP.unpack_from(body, position + used + properties_length)
            if sequence in sent_at:
                arrivals.append((sequence, sent_at[sequence], now))
                got = True
        if acks:
            client.sock.setblocking(True)
            client.sock.sendall(acks)
            client.sock.setblocking(False)
        return got


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value, multiplier, used = 0, 1, 0
    while True:
        byte = data[offset + used]
        value += (byte & 0x7F) * multiplier
        multiplier *= 128
        used += 1
        if not byte & 0x80:
            return value, used
