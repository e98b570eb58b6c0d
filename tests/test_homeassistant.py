"""Home Assistant: typed entity declarations, checked when they are made (discovery: test_worker_ha_responder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts import EntitiesDeclared, Site
from contracts.homeassistant import Availability, BinarySensor, Button, Sensor, discovery_payload
from supervisor.loop import Loop
from supervisor.runtime import WorkerContext


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



def test_a_worker_may_declare_buttons_only_on_its_own_command_topics(tmp_path: Path) -> None:
    site = Site(base_topic="home/sup", node_id="box")
    ctx = WorkerContext("scraper", None, tmp_path, Loop(), site)
    with pytest.raises(ValueError, match=r"^button 'refresh': command_topic must be one of this worker's, "):
        ctx.declare([Button(object_id="refresh", command_topic="home/sup/cmd/other/refresh")])
    ctx.declare([Button(object_id="refresh", command_topic=ctx.command_topic("refresh"))])
    (declared,) = ctx.outgoing
    assert isinstance(declared, EntitiesDeclared)
    config = json.loads(declared.entities[0].config)
    assert config["object_id"] == "scraper_refresh"
    assert config["unique_id"] == "box_scraper_refresh"
    assert config["command_topic"] == "home/sup/cmd/scraper/refresh"
    assert config["availability_mode"] == "all"
