"""The framed pipe between supervisor and worker: whole envelopes only, in order, across partial reads."""

from __future__ import annotations

import select
import socket

import pytest

from contracts import Handled, Inbound, Message, Outbound, Publish, Stop
from supervisor.channel import Channel
from supervisor.errors import ChannelClosed


def pair() -> tuple[Channel[Outbound], Channel[Inbound]]:
    a, b = socket.socketpair()
    return Channel(a, Outbound), Channel(b, Inbound)


def drain(channel: Channel[Inbound], count: int) -> list[Inbound]:
    got: list[Inbound] = []
    while len(got) < count:
        assert select.select([channel], [], [], 5)[0], f"waited for {count} envelopes, got {len(got)}"
        got += channel.receive()
    return got


def test_envelopes_arrive_whole_and_in_order_even_when_the_socket_is_full() -> None:
    supervisor_end, worker_end = pair()
    messages = [Message(id=i, topic=f"t/{i}", payload=bytes(1000)) for i in range(2000)]  # ~2 MB > socket buffer
    for start in range(0, len(messages), 100):
        supervisor_end.send(messages[start : start + 100])
    assert supervisor_end.pending_bytes > 0  # the socket could not take it all at once
    got: list[Inbound] = []
    while len(got) < len(messages):
        supervisor_end.flush()
        select.select([worker_end], [], [], 5)
        got += worker_end.receive()
    assert got == messages


def test_a_frame_split_across_reads_is_held_until_complete() -> None:
    raw_sender, raw_peer = socket.socketpair()
    Channel(raw_sender, Inbound).send([Message(id=1, topic="x", payload=b"y"), Stop()])
    frame = raw_peer.recv(1 << 16)
    writer, reader_sock = socket.socketpair()
    reader: Channel[Inbound] = Channel(reader_sock, Inbound)
    writer.send(frame[:3])
    select.select([reader], [], [], 5)
    assert reader.receive() == []
    writer.send(frame[3:])
    assert drain(reader, 2) == [Message(id=1, topic="x", payload=b"y"), Stop()]


def test_end_of_stream_delivers_what_came_before_then_reports_closed() -> None:
    a, b = socket.socketpair()
    worker_end: Channel[Inbound] = Channel(a, Inbound)
    supervisor_end: Channel[Outbound] = Channel(b, Outbound)
    worker_end.send([Publish(topic="last", payload=b"words"), Handled(id=3, seconds=0.1)])
    a.close()
    select.select([supervisor_end], [], [], 5)
    got = supervisor_end.receive()
    while not supervisor_end.closed:
        assert select.select([supervisor_end], [], [], 5)[0], "waited for the end of the stream"
        got += supervisor_end.receive()
    assert got == [Publish(topic="last", payload=b"words"), Handled(id=3, seconds=0.1)]


def test_writing_to_a_closed_peer_raises_channel_closed() -> None:
    a, b = socket.socketpair()
    channel: Channel[Outbound] = Channel(a, Outbound)
    b.close()
    with pytest.raises(ChannelClosed, match=r"^send failed: "):
        channel.send([Stop()])


def test_garbage_on_the_pipe_raises_channel_closed() -> None:
    a, b = socket.socketpair()
    channel: Channel[Inbound] = Channel(b, Inbound)
    a.send(b"\x03\x00\x00\x00abc")
    select.select([channel], [], [], 5)
    with pytest.raises(ChannelClosed, match=r"^undecodable frame: "):
        channel.receive()
