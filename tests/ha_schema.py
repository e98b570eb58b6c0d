"""Home Assistant's rules for an MQTT discovery config, per release, as its mqtt integration checks them.

The keys and values are in `fixtures/home_assistant_mqtt_schema.json`, read from Home Assistant Core's source
(`homeassistant/components/mqtt/`) of each release named there. `problems(component, config, version)` lists what
that release would reject, drop without a word where we count on the key, or warn about.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

SCHEMA = json.loads((Path(__file__).parent / "fixtures" / "home_assistant_mqtt_schema.json").read_text())
VERSIONS = sorted(SCHEMA["versions"])
CURRENT = "2026.11.0"
OLDEST = "2024.3.3"

# Keys sent on purpose for other releases, which this one drops without a word (unknown top-level keys are removed,
# never an error): `object_id` names the entity before 2025.10, `default_entity_id` from 2025.10, `options` (an
# enum sensor's values) exists from 2024.9.
FOR_OTHER_RELEASES = {"object_id", "default_entity_id", "options"}

_ENTITY_ID = re.compile(r"^[a-z0-9_]+\.[a-z0-9]+(_[a-z0-9]+)*$")


def problems(component: str, config: dict[str, Any], version: str) -> list[str]:
    rules = SCHEMA["versions"][version]
    spec = rules["components"][component]
    found = [f"missing required key {key!r}" for key in spec["required"] if key not in config]
    found += [
        f"unknown key {key!r} (dropped)" for key in config if key not in spec["keys"] and key not in FOR_OTHER_RELEASES
    ]
    found += _nested(config, rules)
    category = config.get("entity_category")
    if category is not None and category not in rules["entity_categories"][component]:
        found.append(f"entity_category {category!r} is not allowed on a {component}")
    if "availability" in config and "availability_topic" in config:
        found.append("availability and availability_topic are exclusive")
    if version == CURRENT:
        found += _values(component, config, rules)
    return found


def _nested(config: dict[str, Any], rules: dict[str, Any]) -> list[str]:
    """`device` and `origin` are strict: one unknown key there and the whole config is rejected."""
    found = []
    device = _expanded(config.get("device", {}), rules["device_abbreviations"])
    origin = _expanded(config.get("origin", {}), rules["origin_abbreviations"])
    found += [f"unknown device key {key!r} (config rejected)" for key in device if key not in rules["device_keys"]]
    found += [f"unknown origin key {key!r} (config rejected)" for key in origin if key not in rules["origin_keys"]]
    if device and not device.get("identifiers"):
        found.append("a device needs at least one identifier")
    if origin and "name" not in origin:
        found.append("an origin needs a name")
    for key, url in (
        ("origin support_url", origin.get("support_url")),
        ("configuration_url", device.get("configuration_url")),
    ):
        if url is not None and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            found.append(f"{key} {url!r} is not an http(s) address (config rejected)")
    for item in config.get("availability", []):
        found += [f"unknown availability key {key!r}" for key in item if key not in rules["availability_item_keys"]]
        if "topic" not in item:
            found.append("an availability item needs a topic")
    return found


def _expanded(keys: dict[str, Any], abbreviations: dict[str, str]) -> dict[str, Any]:
    return {abbreviations.get(key, key): value for key, value in keys.items()}


def _values(component: str, config: dict[str, Any], rules: dict[str, Any]) -> list[str]:
    found = []
    device_class = config.get("device_class")
    if component in ("binary_sensor", "button") and device_class not in (None, *rules[f"{component}_device_classes"]):
        found.append(f"unknown {component} device_class {device_class!r}")
    if component != "sensor":
        return found
    state_class, unit, options = config.get("state_class"), config.get("unit_of_measurement"), config.get("options")
    if device_class is not None and device_class not in rules["sensor_device_classes"]:
        found.append(f"unknown sensor device_class {device_class!r}")
    if state_class is not None and state_class not in rules["sensor_state_classes"]:
        found.append(f"unknown state_class {state_class!r}")
    if options is not None:
        if not options:
            found.append("an empty options list")
        if state_class is not None or unit is not None:
            found.append("options with a state_class or a unit")
        if device_class != "enum":
            found.append("options need device_class enum")
    if device_class in rules["non_numeric_sensor_device_classes"]:
        if unit is not None:
            found.append(f"a unit on a {device_class} sensor (its state is refused)")
        if state_class is not None:
            found.append(f"a state_class on a {device_class} sensor (a warning)")
    units = rules["device_class_units"].get(device_class)
    if units is not None and unit is not None and unit not in units:
        found.append(f"unit {unit!r} is not one of device_class {device_class!r}'s")
    allowed = rules["device_class_state_classes"].get(device_class)
    if allowed is not None and state_class is not None and state_class not in allowed:
        found.append(f"state_class {state_class!r} is impossible with device_class {device_class!r} (a warning)")
    return found


def presentation_problems(component: str, config: dict[str, Any]) -> list[str]:
    """What makes an entity read like internal names rather than a polished integration, and the entity ids."""
    found = []
    name, device = config.get("name"), config.get("device", {})
    if not name:
        found.append("no name")
    elif "_" in name or name != name.strip():
        found.append(f"name {name!r} is not written for people")
    elif device.get("name") and name.lower().startswith(device["name"].lower()):
        found.append(f"name {name!r} repeats its device's name {device['name']!r}")
    if "_" in device.get("name", ""):
        found.append(f"device name {device['name']!r} is not written for people")
    entity_id = config.get("default_entity_id", "")
    if not _ENTITY_ID.match(entity_id) or not entity_id.startswith(f"{component}."):
        found.append(f"default_entity_id {entity_id!r} is not a {component} entity id")
    elif config.get("object_id") != entity_id.partition(".")[2]:
        found.append(f"object_id {config.get('object_id')!r} does not name the entity as default_entity_id does")
    if component == "button" and not config.get("icon"):
        found.append("a button without an icon")
    origin = config.get("origin", {})
    if not urllib.parse.urlsplit(origin.get("support_url") or origin.get("url") or "").scheme:
        found.append("an origin without a url")
    return found
