"""ha_responder against a real broker: discovery from declarations, Home Assistant's birth, buttons, devices on the
bus, and automation feedback."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from conftest import SupervisorFactory, SupervisorProcess
from support import MqttProbe, wait_until

# Keys Home Assistant's MQTT discovery requires per platform (besides unique_id, device and availability).
REQUIRED = {"binary_sensor": {"state_topic"}, "sensor": {"state_topic"}, "button": {"command_topic"}}


def ha_tables(prefix: str, **responder: Any) -> dict[str, Any]:
    return {
        "supervisor": {"worker_packages": ["testworkers", "workers"]},
        "homeassistant": {"discovery_prefix": f"{prefix}/ha", "status_topic": f"{prefix}/ha/status"},
        "responder": {
            "republish_delay_min_seconds": 0.05,
            "republish_delay_max_seconds": 0.1,
            "devices_prefix": f"{prefix}/home",
            "feedback_topic": f"{prefix}/ha-ai/responses/#",
            **responder,
        },
    }


def start(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, declarer: dict[str, Any] | None = None, **more: Any
) -> SupervisorProcess:
    tables = ha_tables(prefix, **more)
    workers = {"ha_responder": tables.pop("responder")}
    if declarer is not None:
        workers["declarer"] = {"out": f"{prefix}/out", **declarer}
    mqtt.subscribe(f"{prefix}/#")
    process = supervisors.start(workers, **tables)
    mqtt.wait_for(f"{supervisors.base}/availability", lambda m: m.text == "online")
    return process


def node(prefix: str) -> str:
    return f"sup-{prefix.replace('/', '-')}"


def config_topic(prefix: str, component: str, object_id: str, own: bool = False) -> str:
    """The discovery topic of a worker's entity, or (`own`) of one of the supervisor's own entities."""
    if own:
        object_id = f"{node(prefix)}_{object_id}"
    return f"{prefix}/ha/{component}/{node(prefix)}/{object_id}/config"


def configs(mqtt: MqttProbe, prefix: str) -> dict[str, dict[str, Any]]:
    """The latest discovery config per topic (removed ones left out)."""
    latest: dict[str, bytes] = {}
    for message in mqtt.messages:
        if message.topic.startswith(f"{prefix}/ha/") and message.topic.endswith("/config"):
            latest[message.topic] = message.payload
    return {topic: json.loads(payload) for topic, payload in latest.items() if payload}


def status_of(mqtt: MqttProbe, base: str, predicate: Any) -> dict[str, Any]:
    (message,) = mqtt.wait_for(f"{base}/status", lambda m: predicate(m.json()))[-1:]
    status: dict[str, Any] = message.json()
    return status


def test_every_declared_entity_becomes_a_valid_discovery_config(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, prefix, declarer={"sensors": ["temperature"], "buttons": ["refresh"]})
    # The supervisor: a status sensor and 5 entities per worker (2 workers); ha_responder: 3 sensors; declarer: 2.
    wait_until(lambda: len(configs(mqtt, prefix)) == 1 + 5 * 2 + 3 + 2, 10, "every discovery config")
    found = configs(mqtt, prefix)
    unique_ids = [config["unique_id"] for config in found.values()]
    assert len(set(unique_ids)) == len(unique_ids)
    for topic, config in found.items():
        component = topic.split("/")[-4]
        assert REQUIRED[component] <= set(config), topic
        assert config["device"]["identifiers"] and config["device"]["name"], topic
        assert config["origin"]["name"] == "mqtt-home-supervisor", topic
        assert config["availability"], topic
    base = supervisors.base
    sensor = found[config_topic(prefix, "sensor", "declarer_temperature")]
    assert sensor["availability"] == [
        {"topic": f"{base}/availability"},
        {"topic": f"{base}/worker/declarer/availability"},
    ]
    assert sensor["availability_mode"] == "all"
    assert sensor["device"]["via_device"] == node(prefix)
    assert sensor["state_topic"] == f"{prefix}/out/temperature"
    own = found[config_topic(prefix, "binary_sensor", "declarer_running", own=True)]
    assert own["availability"] == [{"topic": f"{base}/availability"}]  # the supervisor's: shows the worker down
    restart = found[config_topic(prefix, "button", "declarer_restart", own=True)]
    mqtt.publish(restart["command_topic"], restart.get("payload_press", "PRESS"))  # what Home Assistant sends
    mqtt.wait_for(f"{prefix}/out/temperature", lambda m: not m.retain, count=2)  # published again on its start


def test_a_button_press_reaches_the_worker_that_declared_it_and_a_retained_press_is_dropped(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    command_topic = f"{supervisors.base}/cmd/declarer/refresh"
    mqtt.publish(command_topic, "PRESS", retain=True)  # stale: the broker replays it to every new subscriber
    start(supervisors, mqtt, prefix, declarer={"buttons": ["refresh"]})
    button = mqtt.wait_for(config_topic(prefix, "button", "declarer_refresh"))[0].json()
    assert button["command_topic"] == command_topic
    status_of(mqtt, supervisors.base, lambda s: s["workers"]["declarer"]["errors"].get("retained_command") == 1)
    assert not mqtt.received(f"{prefix}/out/command")
    mqtt.publish(command_topic, "", retain=True)  # clear it: subscribers get an empty message, not a press
    mqtt.publish(command_topic, button.get("payload_press", "PRESS"))
    # In order: had the clearing been taken for a press, its answer would be the first one here.
    assert [press.text for press in mqtt.wait_for(f"{prefix}/out/command")] == ["refresh: PRESS"]


def test_unchanged_configs_are_skipped_and_undeclared_ones_removed_after_a_restart(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    first = start(supervisors, mqtt, prefix, declarer={"sensors": ["kept", "dropped"]})
    kept = config_topic(prefix, "sensor", "declarer_kept")
    dropped = config_topic(prefix, "sensor", "declarer_dropped")
    mqtt.wait_for(dropped)
    first.signal(signal.SIGTERM)
    assert first.wait() == 0

    def sent() -> int:  # live publications (the probe's re-subscription replays the retained one too)
        return len(mqtt.received(kept, lambda m: not m.retain))

    sent_before = sent()
    start(supervisors, mqtt, prefix, declarer={"sensors": ["kept", "added"]})
    mqtt.wait_for(config_topic(prefix, "sensor", "declarer_added"))
    mqtt.wait_for(dropped, lambda m: m.payload == b"")
    fresh = MqttProbe(supervisors.broker.port)  # what Home Assistant would find when it subscribes now
    try:
        fresh.subscribe(dropped, kept)
        fresh.wait_for(kept)
        assert not fresh.received(dropped)  # retained messages come in the order of the filters
    finally:
        fresh.close()
    assert sent() == sent_before  # the broker kept our session and the config: not sent again


def test_home_assistants_birth_brings_discovery_and_availability_again(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, prefix, declarer={"sensors": ["temperature"]})
    sensor = config_topic(prefix, "sensor", "declarer_temperature")
    availability = f"{supervisors.base}/worker/declarer/availability"
    mqtt.wait_for(availability, lambda m: m.text == "online")
    wait_until(lambda: mqtt.received(f"{supervisors.base}/status"), 10, "the first status")
    configs_before = len(mqtt.wait_for(sensor))
    statuses_before = len(mqtt.received(f"{supervisors.base}/status"))
    mqtt.publish(f"{prefix}/ha/status", "online")
    mqtt.wait_for(sensor, count=configs_before + 1)
    mqtt.wait_for(availability, lambda m: m.text == "online", count=2)
    mqtt.wait_for(f"{supervisors.base}/status", count=statuses_before + 1)


def test_an_entity_follows_its_worker_down_and_up(supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str) -> None:
    start(supervisors, mqtt, prefix, declarer={"sensors": ["temperature"]})
    availability = f"{supervisors.base}/worker/declarer/availability"
    mqtt.wait_for(availability, lambda m: m.text == "online")
    online = len(mqtt.received(availability))
    mqtt.publish(f"{supervisors.base}/request/stop", json.dumps({"worker": "declarer"}))
    # (an "offline" may have come already, published while the worker was starting)
    mqtt.wait_for(f"{supervisors.base}/status", lambda m: m.json()["workers"]["declarer"]["state"] == "stopped")
    assert mqtt.received(availability)[online:] and mqtt.received(availability)[-1].text == "offline"
    mqtt.publish(f"{supervisors.base}/request/start", json.dumps({"worker": "declarer"}))
    mqtt.wait_for(availability, lambda m: m.text == "online", count=2)


def request(mqtt: MqttProbe, base: str, action: str, body: dict[str, Any], count: int = 1) -> dict[str, Any]:
    mqtt.publish(f"{base}/ha_responder/request/{action}", json.dumps(body))
    response: dict[str, Any] = mqtt.wait_for(f"{base}/ha_responder/response/{action}", count=count)[-1].json()
    return response


def test_devices_on_the_bus_are_tracked_and_can_be_set(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, prefix)
    base = supervisors.base
    mqtt.wait_for(config_topic(prefix, "sensor", "ha_responder_devices"))
    # Another integration announces a light, with Home Assistant's abbreviations and `~` base topic.
    light = {"~": f"{prefix}/zb/kitchen", "name": "Kitchen", "stat_t": "~/state", "cmd_t": "~/set", "uniq_id": "k1"}
    mqtt.publish(f"{prefix}/ha/light/zb/kitchen/config", json.dumps(light), retain=True)
    mqtt.wait_for(f"{base}/ha_responder/devices", lambda m: m.text == "1")
    mqtt.publish(f"{prefix}/zb/kitchen/state", "ON")
    wait_until(
        lambda: request(mqtt, base, "get_state", {"device": "light/zb/kitchen"}, count=1)["device"]["state"] == "ON",
        10,
        "the kitchen light's state followed",
    )
    # The home's own layout: <prefix>/<type>/<id>/{set,state,availability}.
    mqtt.publish(f"{prefix}/home/switch/pump/state", "OFF")
    mqtt.wait_for(f"{base}/ha_responder/devices", lambda m: m.text == "2")
    listed = request(mqtt, base, "list_devices", {})
    assert [d["id"] for d in listed["devices"]] == ["light/zb/kitchen", "switch/pump"]
    assert listed["devices"][1]["state"] == "OFF"
    answer = request(mqtt, base, "set_state", {"device": "switch/pump", "state": "ON"})
    command_topic = f"{prefix}/home/switch/pump/set"
    assert answer == {"ok": True, "device": "switch/pump", "command_topic": command_topic, "state": "ON"}
    (command,) = mqtt.wait_for(f"{prefix}/home/switch/pump/set")
    assert command.text == "ON"
    unknown = request(mqtt, base, "set_state", {"device": "light/nowhere", "state": "ON"}, count=2)
    assert unknown == {"ok": False, "error": "no device 'light/nowhere'; list_devices names the known ones"}
    mqtt.publish(f"{prefix}/ha/light/zb/kitchen/config", "", retain=True)


def test_automation_feedback_is_kept_and_failures_counted(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    start(supervisors, mqtt, prefix)
    topic = f"{supervisors.base}/ha_responder/automations"
    mqtt.publish(f"{prefix}/ha-ai/responses/morning", json.dumps({"success": True}))
    mqtt.publish(f"{prefix}/ha-ai/responses/night", json.dumps({"success": False, "error": "light unavailable"}))
    (message,) = mqtt.wait_for(topic, lambda m: m.json()["failures"] == 1)
    document = message.json()
    assert document["last"] == {"automation": "night", "outcome": "failed", "message": "light unavailable"}
    assert [r["success"] for r in document["automations"]["morning"]] == [True]


def test_counters_start_at_zero_and_automation_results_survive_a_restart(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    base = supervisors.base
    first = start(supervisors, mqtt, prefix)
    # Retained from the start: Home Assistant shows 0, not "unknown", before anything happened.
    mqtt.wait_for(f"{base}/ha_responder/devices", lambda m: m.text == "0")
    mqtt.wait_for(f"{base}/ha_responder/automation_failures", lambda m: m.text == "0")
    assert not mqtt.received(f"{base}/ha_responder/automations")  # no result yet: the last result stays unknown
    mqtt.publish(f"{prefix}/ha-ai/responses/night", json.dumps({"success": False, "error": "light unavailable"}))
    mqtt.wait_for(f"{base}/ha_responder/automation_failures", lambda m: m.text == "1")
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    seen = len(mqtt.messages)
    start(supervisors, mqtt, prefix)

    def published_by_the_second(topic: str) -> list[Any]:
        return [m for m in mqtt.messages[seen:] if m.topic == f"{base}/ha_responder/{topic}" and not m.retain]

    wait_until(lambda: published_by_the_second("automations"), 10, "the kept results published again")
    document = published_by_the_second("automations")[-1].json()
    assert document["failures"] == 1 and document["last"]["automation"] == "night"
    assert published_by_the_second("automation_failures")[-1].text == "1"


def test_a_second_supervisor_on_another_host_adds_its_own_entities_beside_the_first(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str, tmp_path: Path
) -> None:
    start(supervisors, mqtt, prefix, declarer={"sensors": ["temperature"], "buttons": ["refresh"]})
    second = ha_tables(prefix)
    responder = second.pop("responder")
    second["supervisor"] |= {"base_topic": f"{prefix}/second", "state_dir": str(tmp_path / "second")}
    second["mqtt"] = {"client_id": "Second-Host"}
    supervisors.start(
        {"ha_responder": responder, "declarer": {"out": f"{prefix}/out2", "sensors": ["temperature"]}}, **second
    )
    each = 1 + 5 * 2 + 3  # the supervisor's own and ha_responder's, per supervisor
    wait_until(lambda: len(configs(mqtt, prefix)) == 2 * each + 2 + 1, 15, "the configs of both supervisors")
    found = configs(mqtt, prefix)
    for key in ("unique_id", "default_entity_id", "object_id"):
        values = [config[key] for config in found.values()]
        assert len(set(values)) == len(values), key  # no `_2` suffixes in Home Assistant
    theirs = [c for c in found.values() if c["device"]["identifiers"][0].startswith("Second-Host")]
    assert len(theirs) == each + 1
    assert all(c["default_entity_id"].split(".")[1].startswith("second_host_") for c in theirs)
    temperature = [c for c in theirs if c["unique_id"] == "Second-Host_declarer_temperature"]
    assert temperature[0]["default_entity_id"] == "sensor.second_host_declarer_temperature"
    # Neither takes the other's entities for devices of the home: a real one, announced after them, is the first.
    light = {"name": "Kitchen", "stat_t": f"{prefix}/zb/kitchen/state", "uniq_id": "k1"}
    mqtt.publish(f"{prefix}/ha/light/zb/kitchen/config", json.dumps(light), retain=True)
    for base in (supervisors.base, f"{prefix}/second"):
        mqtt.wait_for(f"{base}/ha_responder/devices", lambda m: m.text == "1")
        assert {m.text for m in mqtt.received(f"{base}/ha_responder/devices")} <= {"0", "1"}, base
    mqtt.publish(f"{prefix}/ha/light/zb/kitchen/config", "", retain=True)


def test_a_reload_removes_a_removed_workers_entities_and_adds_an_added_ones(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    process = start(supervisors, mqtt, prefix, declarer={"sensors": ["temperature"]})
    # The supervisor: a status sensor and 5 entities per worker (2 workers); ha_responder: 3 sensors; declarer: 1.
    wait_until(lambda: len(configs(mqtt, prefix)) == 1 + 5 * 2 + 3 + 1, 10, "every discovery config")
    declarer = [t for t in configs(mqtt, prefix) if "declarer_" in t]
    assert len(declarer) == 5 + 1
    tables = ha_tables(prefix)
    workers = {"ha_responder": tables.pop("responder"), "echo": {"topics": [f"{prefix}/in"], "out": f"{prefix}/o"}}
    process.config_path.write_text(supervisors.config(workers, **tables).read_text())
    process.signal(signal.SIGHUP)
    # The declarer's entities (its own and the supervisor's about it) go; the echo worker's come.
    wait_until(lambda: not any(t in configs(mqtt, prefix) for t in declarer), 10, "the removed worker's entities gone")
    for topic in declarer:
        assert mqtt.received(topic)[-1].payload == b""  # an empty retained config: Home Assistant removes it
    wait_until(
        lambda: config_topic(prefix, "binary_sensor", f"{node(prefix)}_echo_running") in configs(mqtt, prefix),
        10,
        "the added worker's entities",
    )
    assert len(configs(mqtt, prefix)) == 1 + 5 * 2 + 3
