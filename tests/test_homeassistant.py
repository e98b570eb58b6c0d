"""Home Assistant: typed entity declarations, checked when they are made (discovery: test_worker_ha_responder)."""

from __future__ import annotations

import json
from pathlib import Path

import ha_schema
import pytest

from contracts import EntitiesDeclared, Site
from contracts.homeassistant import Availability, BinarySensor, Button, Sensor, discovery_payload
from supervisor.loop import Loop
from supervisor.worker_context import WorkerContext


def test_declarations_are_checked_when_they_are_made() -> None:
    with pytest.raises(ValueError, match=r"^button 'reboot': expected a command_topic$"):
        Button(object_id="reboot", unique_id="u", command_topic="")
    with pytest.raises(ValueError, match=r"^sensor 'bad id': object_id may hold only letters, digits, _ and -$"):
        Sensor(object_id="bad id", unique_id="u", state_topic="t")
    with pytest.raises(ValueError, match=r"^sensor 'mode': a sensor with options \(an enum\) cannot have a unit$"):
        Sensor(object_id="mode", unique_id="u", state_topic="t", options=["a", "b"], unit_of_measurement="W")


def test_a_declaration_encodes_only_what_is_set_and_its_entity_id_for_old_and_new_home_assistant() -> None:
    sensor = BinarySensor(object_id="x", unique_id="u", state_topic="s", availability=[Availability(topic="a")])
    assert json.loads(discovery_payload(sensor, "Sup-VM_x")) == {
        "object_id": "sup_vm_x",  # before Home Assistant 2025.10 (ignored from 2026.4)
        "default_entity_id": "binary_sensor.sup_vm_x",  # from 2025.10
        "unique_id": "u",
        "state_topic": "s",
        "availability": [{"topic": "a"}],
    }


def test_the_schema_check_finds_what_home_assistant_rejects_or_drops() -> None:
    good = {
        "name": "Errors",
        "state_topic": "t",
        "unique_id": "u",
        "object_id": "box_errors",
        "default_entity_id": "sensor.box_errors",
        "device": {"identifiers": ["box"], "name": "Box"},
        "origin": {"name": "o", "sw": "1", "url": "https://example.org"},
        "state_class": "total_increasing",
    }
    for version in ha_schema.VERSIONS:
        assert ha_schema.problems("sensor", good, version) == []
    assert ha_schema.presentation_problems("sensor", good) == []
    bad = {
        **good,
        "device": {"identifiers": ["box"], "name": "Box", "model_id": "m"},  # Home Assistant 2024.9 and later only
        "entity_category": "config",
        "stat_cla": "measurement",
    }
    assert ha_schema.problems("sensor", bad, ha_schema.OLDEST) == [
        "unknown key 'stat_cla' (dropped)",
        "unknown device key 'model_id' (config rejected)",
        "entity_category 'config' is not allowed on a sensor",
    ]
    timestamp = {**good, "device_class": "timestamp", "unit_of_measurement": "s", "options": []}
    assert ha_schema.problems("sensor", timestamp, ha_schema.CURRENT) == [
        "an empty options list",
        "options with a state_class or a unit",
        "options need device_class enum",
        "a unit on a timestamp sensor (its state is refused)",
        "a state_class on a timestamp sensor (a warning)",
        "state_class 'total_increasing' is impossible with device_class 'timestamp' (a warning)",
    ]
    assert ha_schema.presentation_problems("button", {**good, "name": "Box restart", "default_entity_id": "x"}) == [
        "name 'Box restart' repeats its device's name 'Box'",
        "default_entity_id 'x' is not a button entity id",
        "a button without an icon",
    ]


def test_a_worker_may_declare_buttons_only_on_its_own_command_topics(tmp_path: Path) -> None:
    site = Site(base_topic="home/sup", node_id="box")
    ctx = WorkerContext("scraper", None, tmp_path, Loop(), site)
    with pytest.raises(ValueError, match=r"^button 'refresh': command_topic must be one of this worker's, "):
        ctx.declare([Button(object_id="refresh", command_topic="home/sup/cmd/other/refresh")])
    ctx.declare([Button(object_id="refresh", command_topic=ctx.command_topic("refresh"))])
    (declared,) = ctx.outgoing
    assert isinstance(declared, EntitiesDeclared)
    assert declared.entities[0].topic("homeassistant", "box") == "homeassistant/button/box/scraper_refresh/config"
    config = json.loads(declared.entities[0].config)
    assert (config["object_id"], config["default_entity_id"]) == ("box_scraper_refresh", "button.box_scraper_refresh")
    assert config["unique_id"] == "box_scraper_refresh"
    assert config["device"]["name"] == "Scraper on localhost" and config["device"]["via_device"] == "box"
    assert config["command_topic"] == "home/sup/cmd/scraper/refresh"
    assert config["availability_mode"] == "all"


def test_a_worker_may_not_take_the_object_ids_of_the_supervisors_entities_about_it(tmp_path: Path) -> None:
    ctx = WorkerContext("scraper", None, tmp_path, Loop(), Site(base_topic="home/sup", node_id="box"))
    with pytest.raises(ValueError, match=r"^sensor 'errors': the supervisor's own entity of this worker has this "):
        ctx.declare([Sensor(object_id="errors", state_topic="t")])
