"""Typed handlers against a real broker and real worker processes: each message decoded for the handler that
declared its filter, undecodable ones counted, the rest to on_message; a worker's own status fields."""

from __future__ import annotations

import json

import msgspec
from conftest import SupervisorFactory
from support import MqttProbe
from testworkers.typed import Reading


def test_each_message_reaches_its_typed_handler_decoded_and_a_bad_one_is_a_decode_error(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    into, out = f"{prefix}/in", f"{prefix}/out"
    mqtt.subscribe(f"{prefix}/#")
    supervisors.start({"typed": {"prefix": into, "out": out}})
    mqtt.wait_for(f"{supervisors.base}/worker/typed/availability", lambda m: m.text == "online")
    mqtt.publish(f"{into}/reading", json.dumps({"sensor": "kitchen", "value": 21.5}), qos=1)
    mqtt.publish(f"{into}/reading", b'{"sensor": "kitchen"}', qos=1)  # no value: does not decode as a Reading
    mqtt.publish(f"{into}/blob", msgspec.msgpack.encode(Reading(sensor="hall", value=19.0)), qos=1)
    mqtt.publish(f"{into}/note", "hello", qos=1)
    mqtt.publish(f"{into}/other", "plain", qos=1)
    mqtt.publish(f"{into}/later", json.dumps({"sensor": "attic", "value": 7}), qos=1)
    readings = [m.json() for m in mqtt.wait_for(f"{out}/reading", count=3)]
    assert sorted((r["sensor"], r["value"], r["topic"]) for r in readings) == [
        ("attic", 7.0, f"{into}/later"),
        ("hall", 19.0, f"{into}/blob"),
        ("kitchen", 21.5, f"{into}/reading"),
    ]
    assert mqtt.wait_for(f"{out}/note")[0].json() == {"text": "hello"}
    assert mqtt.wait_for(f"{out}/on_message")[0].json() == {"topic": f"{into}/other", "payload": "plain"}
    status = mqtt.wait_for(
        f"{supervisors.base}/status", lambda m: m.json()["workers"]["typed"].get("fields", {}).get("readings") == 3
    )[-1].json()["workers"]["typed"]
    assert status["errors"] == {"decode": 1} and status["handled"] == 6
