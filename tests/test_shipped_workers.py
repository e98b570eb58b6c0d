"""Every shipped worker, as a user runs it: each one alone through start, one message and stop; all four together,
with every entity they declare checked against what Home Assistant's MQTT discovery accepts."""

from __future__ import annotations

import signal
from typing import Any

import ha_schema
import msgspec
import pytest
from conftest import SupervisorFactory
from support import MqttProbe, wait_until
from test_worker_ha_responder import configs
from test_worker_ha_responder import node as ha_node

from contracts import Site
from contracts.homeassistant import slug
from supervisor.registry import discover

SHIPPED = sorted(discover(["workers"]))


def minimal(name: str, prefix: str) -> dict[str, Any]:
    """The smallest sensible config of each shipped worker, on this test's topics and with no outside service."""
    tables: dict[str, dict[str, Any]] = {
        "scraper": {
            "sources": [
                {
                    "name": "nowhere",
                    "url": "http://127.0.0.1:9/",
                    "items": "li",
                    "fields": {"title": "h3", "date": "time"},
                }
            ],
            "retries": 0,
            "timeout_seconds": 1.0,
        },
        "ai_analyzer": {"base_url": "http://127.0.0.1:9/v1", "timeout_seconds": 1.0, "retries": 0},
        "batch_scheduler": {"record_topics": [f"{prefix}/home/+/+/state"], "use_ai": False},
        "ha_responder": {
            "devices_prefix": f"{prefix}/home",
            "feedback_topic": f"{prefix}/ha-ai/responses/#",
            "republish_delay_min_seconds": 0.05,
            "republish_delay_max_seconds": 0.1,
        },
    }
    return tables.get(name, {})


def tables(prefix: str) -> dict[str, Any]:
    return {
        "supervisor": {"worker_packages": ["workers"]},
        "homeassistant": {"discovery_prefix": f"{prefix}/ha", "status_topic": f"{prefix}/ha/status"},
    }


def latest_status(mqtt: MqttProbe, base: str, predicate: Any, what: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        statuses = [m.json() for m in mqtt.received(f"{base}/status")]
        return statuses[-1] if statuses and predicate(statuses[-1]) else None

    status: dict[str, Any] = wait_until(found, 15, what)
    return status


def test_the_four_workers_ship() -> None:
    assert SHIPPED == ["ai_analyzer", "batch_scheduler", "ha_responder", "scraper"]


@pytest.mark.parametrize("name", SHIPPED)  # every worker found in `workers/`, the ones a user adds too
def test_every_discovered_worker_starts_handles_its_example_message_and_stops(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, name: str
) -> None:
    # Its own example section and message (`Worker.example_config`, `example_message`): no outside service.
    worker_class = discover(["workers"])[name]
    mqtt.subscribe(f"{prefix}/#")
    process = supervisors.start({name: dict(worker_class.example_config)}, **tables(prefix))
    base = supervisors.base
    mqtt.wait_for(f"{base}/worker/{name}/availability", lambda m: m.text == "online")
    worker = worker_class()
    worker.config = msgspec.convert(worker_class.example_config, worker_class.Config)
    ha = tables(prefix)["homeassistant"]
    worker.site = Site(
        base_topic=base, discovery_prefix=ha["discovery_prefix"], homeassistant_status_topic=ha["status_topic"]
    )
    example = worker.example_message()
    if example is None:
        pytest.skip(f"{name} takes no message")
    mqtt.publish(*example, qos=1)
    status = latest_status(mqtt, base, lambda s: s["workers"][name]["handled"] >= 1, f"{name} to handle a message")
    assert status["workers"][name]["state"] == "running"
    assert not {"handler", "decode", "start"} & set(status["workers"][name]["errors"])
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    assert f"worker {name} stopped: exit code 0" in process.log()


def check_entity(topic: str, config: dict[str, Any]) -> None:
    """`config` passes every rule of every Home Assistant release in the schema file, and reads well."""
    component = topic.split("/")[-4]
    for version in ha_schema.VERSIONS:
        assert ha_schema.problems(component, config, version) == [], f"{topic} on Home Assistant {version}"
    assert ha_schema.presentation_problems(component, config) == [], topic
    assert config["origin"]["name"] == "mqtt-home-supervisor", topic
    assert config["availability"] and config["unique_id"], topic


def test_with_the_four_shipped_workers_every_entity_is_valid_and_every_button_reaches_its_worker(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    mqtt.subscribe(f"{prefix}/#")
    more = {"homeassistant": {**tables(prefix)["homeassistant"], "support_url": "https://example.org/help"}}
    supervisors.start({name: minimal(name, prefix) for name in SHIPPED}, **{**tables(prefix), **more})
    base = supervisors.base
    # The supervisor: a status sensor and 5 entities per worker; scraper 4, ai_analyzer 5, batch_scheduler 5,
    # ha_responder 3 of their own.
    expected = 1 + 5 * 4 + 4 + 5 + 5 + 3
    wait_until(lambda: len(configs(mqtt, prefix)) == expected, 15, f"{expected} discovery configs")
    found = configs(mqtt, prefix)
    for topic, config in found.items():
        check_entity(topic, config)
        assert config["origin"]["url"] == "https://example.org/help", topic
    for key in ("unique_id", "default_entity_id"):
        values = [c[key] for c in found.values()]
        assert len(set(values)) == len(values), key
    node = ha_node(prefix)
    devices = {c["device"]["identifiers"][0]: c["device"] for c in found.values()}
    assert {d["name"].rsplit(" on ", 1)[0] for d in devices.values()} == {
        "MQTT home supervisor",
        "Web scraper",
        "AI analyzer",
        "Batch analysis",
        "Home Assistant responder",
    }
    for identifier, device in devices.items():  # the same device, described the same way by every entity
        assert all(c["device"] == device for c in found.values() if c["device"]["identifiers"][0] == identifier)
    declared = {t: c for t, c in found.items() if len(c["availability"]) == 2}
    workers_of = {f"{node}_{name}": name for name in SHIPPED}
    assert {workers_of[c["device"]["identifiers"][0]] for c in declared.values()} == set(SHIPPED)
    for config in declared.values():
        worker = workers_of[config["device"]["identifiers"][0]]
        assert config["default_entity_id"].split(".")[1].startswith(f"{slug(node)}_{worker}_")
        assert config["availability"] == [
            {"topic": f"{base}/availability"},
            {"topic": f"{base}/worker/{worker}/availability"},
        ]
        assert config["availability_mode"] == "all"
    buttons = [c for c in declared.values() if "command_topic" in c]
    assert sorted(c["command_topic"].rsplit("/", 2)[1] for c in buttons) == [
        "ai_analyzer",
        "batch_scheduler",
        "scraper",
    ]
    before = latest_status(mqtt, base, lambda s: True, "a status")
    for button in buttons:
        mqtt.publish(button["command_topic"], button.get("payload_press", "PRESS"))
    for button in buttons:
        worker = button["command_topic"].rsplit("/", 2)[1]
        handled = before["workers"][worker]["handled"]
        status = latest_status(
            mqtt, base, lambda s, w=worker, h=handled: s["workers"][w]["handled"] > h, f"{worker} to get its press"
        )
        assert not {"handler", "decode"} & set(status["workers"][worker]["errors"]), worker
