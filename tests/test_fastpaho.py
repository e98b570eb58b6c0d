"""supervisor.fastpaho against the installed paho-mqtt: every private name it relies on is still there, and a real
Mosquitto's plain messages take its fast paths.

paho does not promise its private names. When a release renames or changes one, the tests here fail and name it
(a supervisor on that release logs a warning at start, and its fast-path counters stay still).
"""

from __future__ import annotations

import ast
import inspect
import itertools
import socket
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import SupervisorFactory
from paho.mqtt import __version__ as paho_version
from support import MqttProbe, free_port, wait_until
from test_health import samples, scrape
from test_supervisor import echo, start, wait_echo

from supervisor import fastpaho
from supervisor.fastpaho import CALLED, PAHO_ATTRIBUTES, PAHO_METHODS, BufferedClient, new_client

ROOT = Path(__file__).resolve().parent.parent
OVERRIDDEN = sorted(name for name in PAHO_METHODS if name in vars(BufferedClient))
# Private names fastpaho defines for itself; every other private name it touches is paho's.
OWN_PRIVATES = {"_buffer", "_position", "_pending", "_connected_socket", "_flush", "_packed"}


@pytest.mark.parametrize("name", list(PAHO_METHODS))
def test_each_paho_method_the_fast_paths_override_or_call_exists_with_the_expected_parameters(name: str) -> None:
    method = getattr(paho.Client, name, None)
    assert callable(method), f"paho-mqtt {paho_version} has no Client.{name}"
    assert tuple(inspect.signature(method).parameters) == PAHO_METHODS[name], f"paho-mqtt {paho_version}"


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_each_override_takes_the_parameters_of_the_paho_method_it_replaces(name: str) -> None:
    ours = tuple(inspect.signature(getattr(BufferedClient, name)).parameters)
    assert ours == tuple(inspect.signature(getattr(paho.Client, name)).parameters)


def test_the_client_overrides_seven_paho_methods_and_calls_three() -> None:
    assert sorted(set(PAHO_METHODS) - set(CALLED)) == OVERRIDDEN
    assert len(OVERRIDDEN) == 7


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_each_paho_attribute_the_fast_paths_read_exists_on_a_client_made_as_the_link_makes_it(v5: bool) -> None:
    client = new_client("guard", v5)
    assert [name for name in PAHO_ATTRIBUTES if not hasattr(client, name)] == [], f"paho-mqtt {paho_version}"
    assert {"command", "packet"} <= client._in_packet.keys()  # what _handle_publish and _handle_pubackcomp read
    assert client._protocol == (paho.MQTTv5 if v5 else paho.MQTTv311)

    def on_publish(*args: object) -> None: ...

    client.on_publish = on_publish
    assert client._on_publish is on_publish  # what _packet_write hides while writing
    info = client.publish("guard/unconfirmed", b"kept", qos=1)  # not connected: paho keeps it to send later
    with client._out_message_mutex:
        assert list(client._out_messages) == [info.mid]
    assert [message.mid for message in client.unconfirmed()] == [info.mid]
    assert fastpaho.paho_differences(client) == []


def test_paho_differences_names_each_method_gone_or_changed_and_each_attribute_missing() -> None:
    # A stand-in for a paho release that dropped `_handle_publish`, renamed a parameter and an attribute.
    namespace = {name: getattr(paho.Client, name) for name in PAHO_METHODS if name != "_handle_publish"}
    namespace["_sock_recv"] = lambda self, size: b""
    changed = type("Client", (), namespace)()
    for name in PAHO_ATTRIBUTES:
        if name != "_in_packet":
            setattr(changed, name, None)
    assert fastpaho.paho_differences(changed, type(changed)) == [
        "Client._sock_recv takes (self, size), not (self, bufsize)",
        "Client._handle_publish is gone",
        "a client has no _in_packet",
    ]


def private_names(path: Path) -> dict[str, set[str]]:
    """Private attribute names used in a module, by what they are read on: `self`, `super()` or anything else."""
    found: dict[str, set[str]] = {"self": set(), "super()": set(), "other": set()}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id == "self":
                found["self"].add(node.attr)
            elif isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                found["super()"].add(node.attr)
            else:
                found["other"].add(f"{ast.unparse(owner)}.{node.attr}")
    return found


def test_every_paho_private_fastpaho_uses_is_in_its_lists() -> None:
    used = private_names(ROOT / "supervisor" / "fastpaho.py")
    assert used["other"] == set()
    assert used["super()"] == set(OVERRIDDEN)
    assert used["self"] - OWN_PRIVATES == set(PAHO_ATTRIBUTES) | set(CALLED)


def test_the_mqtt_link_reads_no_private_name_of_paho() -> None:
    used = private_names(ROOT / "supervisor" / "mqtt.py")
    assert used["other"] == set()  # private names only on the link itself (it has no base class)
    assert used["super()"] == set()


def fast_path(port: int) -> dict[str, float]:
    """The fast-path counters and messages received, from one scrape of /metrics."""
    found = samples(scrape(port))
    return {
        "publish": found[("supervisor_mqtt_fast_path_packets_total", frozenset({("packet", "publish")}))],
        "puback": found[("supervisor_mqtt_fast_path_packets_total", frozenset({("packet", "puback")}))],
        "received": found[("supervisor_mqtt_messages_received_total", frozenset())],
    }


@pytest.mark.parametrize("protocol", [5, 311])
def test_plain_messages_through_a_real_broker_take_the_fast_paths_both_ways(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, protocol: int
) -> None:
    # In: plain QoS 0 and 1 PUBLISH packets (no properties). Out: the echoes at QoS 1, each confirmed by a PUBACK.
    port = free_port()
    out = f"{prefix}/out/echo"
    start(supervisors, mqtt, {"echo": echo(prefix, qos=1)}, {"mqtt": {"protocol": protocol}, "metrics": {"port": port}})
    mqtt.publish(f"{prefix}/in/first", "first")  # after whatever arrived on subscribing (retained messages)
    wait_echo(mqtt, out, "first")
    before = fast_path(port)
    count = 100
    for n in range(count):
        mqtt.publish(f"{prefix}/in/plain", f"plain {n}", qos=n % 2)
    mqtt.wait_for(f"{out}/echo", count=count + 1)

    def confirmed() -> dict[str, float] | None:
        now = fast_path(port)
        return now if now["puback"] - before["puback"] >= count else None

    after = wait_until(confirmed, 10, f"{count} more PUBACKs on the fast path than {before['puback']:g}")
    assert after["received"] - before["received"] == count
    assert after["publish"] - before["publish"] == count  # every one of them


# Framing: packets read from a real socket, whole or in pieces ---------------------------------------------------------


def publish_packet(topic: str, payload: bytes) -> bytes:
    """A plain MQTT 5 PUBLISH at QoS 0: no properties."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + b"\x00" + payload
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([0x30]) + bytes(encoded) + body


@pytest.fixture
def reading() -> Iterator[tuple[BufferedClient, socket.socket, list[tuple[str, bytes]]]]:
    """A link's client reading what the test writes into the other end of a socket pair."""
    client = new_client("framing", v5=True)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    got: list[tuple[str, bytes]] = []
    client.on_plain_publish = lambda topic, payload, qos, retain, mid: got.append((topic, payload))
    client._sock = ours  # what paho's connect sets
    yield client, theirs, got
    ours.close()
    theirs.close()


@pytest.mark.parametrize("size", [0, 100, 200, 16_000, 20_000, 100_000])
def test_packets_of_every_length_arrive_whole_in_one_read_or_split_at_any_byte(
    reading: tuple[BufferedClient, socket.socket, list[tuple[str, bytes]]], size: int
) -> None:
    # One- to three-byte lengths; a frame larger than the 64 KiB read; a second packet behind each one.
    client, theirs, got = reading
    first, second = publish_packet("t/first", b"a" * size), publish_packet("t/second", b"b")
    stream = first + second
    cuts = [1, 2, 3, len(first) // 2, len(first) - 1, len(first), len(first) + 1]
    pieces = [stream[a:b] for a, b in itertools.pairwise([0, *cuts, len(stream)])]
    for piece in pieces:
        theirs.sendall(piece)
        while client._packet_read() == paho.MQTT_ERR_SUCCESS:  # until what came is read: MQTT_ERR_AGAIN
            pass
    assert got == [("t/first", b"a" * size), ("t/second", b"b")]
    assert client._in_packet["command"] == 0  # nothing half read


def test_a_closed_connection_is_a_lost_connection(
    reading: tuple[BufferedClient, socket.socket, list[tuple[str, bytes]]],
) -> None:
    client, theirs, got = reading
    theirs.sendall(publish_packet("t/last", b"x"))
    theirs.close()
    assert client._packet_read() == paho.MQTT_ERR_SUCCESS
    assert got == [("t/last", b"x")]
    assert client._packet_read() == paho.MQTT_ERR_CONN_LOST


def test_a_ping_response_is_read_on_the_fast_path(
    reading: tuple[BufferedClient, socket.socket, list[tuple[str, bytes]]],
) -> None:
    client, theirs, _ = reading
    client._ping_t = 1.0  # a PINGREQ is out
    theirs.sendall(b"\xd0\x00")  # PINGRESP
    assert client._packet_read() == paho.MQTT_ERR_SUCCESS
    assert client._ping_t == 0
