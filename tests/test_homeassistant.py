"""Home Assistant: typed entity declarations, and the supervisor's own device as Home Assistant discovers it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import SupervisorFactory
from support import MqttProbe
from test_supervisor import echo, start

from contracts.homeassistant import Availability, BinarySensor, Button, Sensor, discovery_payload

# Keys Home Assistant's MQTT discovery requires per platform (besides unique_id, device and availability).
REQUIRED = {"binary_sensor": {"state_topic"}, "sensor": {"state_topic"}, "button": {"command_topic"}}


def test_declarations_are_checked_when_they_are_made() -> None:
    with pytest.raises(ValueError, match=r"^button 'reboot': expected a command_topic$"):
        Button(object_id="reboot", unique_id="u", command_topic="")
    with pytest.raises(ValueError, match=r"^sensor 'bad id': object_id may hold only letters, digits, _ and -$"):
        Sensor(object_id="bad id", unique_id="u", state_topic="t")
    with pytest.raises(ValueError, match=r"^sensor 'mode': a sensor with options \(an enum\) cannot have a unit$"):
        Sensor(object_id="mode", unique_id="u", state_topic="t", options=["a", "b"], unit_of_measurement="W")


def test_a_declaration_encodes_only_what_is_set() -> None:
    sensor = BinarySensor(object_id="x", unique_id="u", state_topic="s", availability=[Availability(topic="a")])
    assert json.loads(discovery_payload(sensor)) == {
        "object_id": "x",
        "unique_id": "u",
        "state_topic": "s",
        "availability": [{"topic": "a"}],
    }


def discovery(probe: MqttProbe, prefix: str) -> dict[str, dict[str, Any]]:
    return {m.topic: m.json() for m in probe.messages if m.topic.startswith(f"{prefix}/ha/") and m.payload}


def test_the_supervisor_is_a_device_with_entities_per_worker(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    ha = {"discovery_prefix": f"{prefix}/ha", "status_topic": f"{prefix}/ha/status"}
    start(supervisors, mqtt, {"echo": echo(prefix)}, {"homeassistant": ha})
    mqtt.wait_for(
        f"{prefix}/ha/button/sup-{prefix.replace('/', '-')}/sup-{prefix.replace('/', '-')}_echo_restart/config"
    )
    configs = discovery(mqtt, prefix)
    assert len(configs) == 5  # the status sensor, and four entities for the one worker
    for topic, config in configs.items():
        component = topic.split("/")[-4]
        assert REQUIRED[component] <= set(config), topic
        assert config["unique_id"] and config["device"]["identifiers"] and config["device"]["name"]
        assert config["origin"]["name"] == "mqtt-home-supervisor"
        assert config["availability"] == [{"topic": f"{supervisors.base}/availability"}]
    button = next(c for t, c in configs.items() if "/button/" in t)
    assert button["command_topic"] == f"{supervisors.base}/cmd/echo/restart"
    mqtt.publish(button["command_topic"], button.get("payload_press", "PRESS"))  # what Home Assistant sends
    mqtt.wait_for(f"{prefix}/out/echo/started", count=2)


def test_home_assistants_birth_brings_discovery_again(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    ha = {"discovery_prefix": f"{prefix}/ha", "status_topic": f"{prefix}/ha/status"}
    start(supervisors, mqtt, {"echo": echo(prefix)}, {"homeassistant": ha})
    node = f"sup-{prefix.replace('/', '-')}"
    running = f"{prefix}/ha/binary_sensor/{node}/{node}_echo_running/config"
    mqtt.wait_for(running)
    mqtt.publish(f"{prefix}/ha/status", "online")
    mqtt.wait_for(running, count=2, timeout=10)
