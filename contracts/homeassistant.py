"""Home Assistant MQTT discovery, typed: devices and entities are Structs, checked when they are declared.

`discovery_topic(prefix, node_id, entity)` and `discovery_payload(entity, entity_id)` give what to publish (retained)
for Home Assistant to create the entity. Only the keys that are set are sent, plus the entity id Home Assistant should
give it, twice: `default_entity_id` (Home Assistant 2025.10 and later) and `object_id` (before 2025.10; ignored
from 2026.4, and with `default_entity_id` beside it no deprecation warning in between). Home Assistant drops unknown
top-level keys silently, but rejects a whole config for one unknown key in `device` or `origin`: only keys that
every version since 2024.3 knows are declared there.

Workers declare entities through their context (`ctx.declare`); the supervisor collects every declaration into one
`DiscoveryBundle`, which it sends (local-only) on `Site.entities_topic` to the worker that publishes discovery.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

import msgspec

_OBJECT_ID = re.compile(r"^[a-zA-Z0-9_-]+$")

# The object ids of the supervisor's entities on a worker's device (`supervisor.ha_entities`), which the worker's own
# may not take.
RESERVED_OBJECT_IDS = frozenset({"running", "errors", "restarts", "last_crash", "restart"})


class Device(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    identifiers: list[str]
    name: str
    manufacturer: str | None = None
    model: str | None = None
    sw_version: str | None = None
    via_device: str | None = None
    configuration_url: str | None = None  # Home Assistant's "Visit" link on the device's page

    def __post_init__(self) -> None:
        if not self.identifiers:
            raise ValueError(f"device {self.name!r}: expected at least one identifier")


class Origin(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    sw_version: str | None = msgspec.field(default=None, name="sw")
    support_url: str | None = msgspec.field(default=None, name="url")


class Availability(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    topic: str
    payload_available: str = "online"
    payload_not_available: str = "offline"


class Entity(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Keys every discovered entity has. `object_id` names it in its discovery topic; `name` is what a person reads
    after the device's name ("Restarts" on the device "Web scraper on box")."""

    component: ClassVar[str]
    object_id: str
    unique_id: str = ""  # filled in by `ctx.declare` when left empty
    name: str | None = None
    device: Device | None = None
    origin: Origin | None = None
    availability: list[Availability] = msgspec.field(default_factory=list)
    availability_mode: Literal["all", "any", "latest"] = "latest"
    entity_category: Literal["config", "diagnostic"] | None = None
    icon: str | None = None

    def __post_init__(self) -> None:
        if not _OBJECT_ID.match(self.object_id):
            raise ValueError(f"{self.component} {self.object_id!r}: object_id may hold only letters, digits, _ and -")


class BinarySensor(Entity, frozen=True, kw_only=True, omit_defaults=True):
    component: ClassVar[str] = "binary_sensor"
    state_topic: str
    value_template: str | None = None
    payload_on: str = "ON"
    payload_off: str = "OFF"
    device_class: str | None = None


class Sensor(Entity, frozen=True, kw_only=True, omit_defaults=True):
    component: ClassVar[str] = "sensor"
    state_topic: str
    value_template: str | None = None
    unit_of_measurement: str | None = None
    device_class: str | None = None
    state_class: Literal["measurement", "total", "total_increasing"] | None = None
    options: list[str] | None = None
    expire_after: int | None = None
    json_attributes_topic: str | None = None
    json_attributes_template: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.options is not None and self.unit_of_measurement is not None:
            raise ValueError(f"sensor {self.object_id!r}: a sensor with options (an enum) cannot have a unit")


class Button(Entity, frozen=True, kw_only=True, omit_defaults=True):
    component: ClassVar[str] = "button"
    command_topic: str
    payload_press: str = "PRESS"
    device_class: Literal["identify", "restart", "update"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.command_topic:
            raise ValueError(f"button {self.object_id!r}: expected a command_topic")


class DeclaredEntity(msgspec.Struct, frozen=True, kw_only=True):
    """One entity as declared, ready to publish: its discovery config is already encoded JSON."""

    component: str
    object_id: str
    config: bytes

    def topic(self, prefix: str, node_id: str) -> str:
        return f"{prefix}/{self.component}/{node_id}/{self.object_id}/config"


class DiscoveryBundle(msgspec.Struct, frozen=True, kw_only=True):
    """Every entity the supervisor and its workers declared, by owner (`supervisor` or a worker's name).

    `owners` are all configured owners; `declared` holds those whose declarations are known in this run (a worker's
    are known once it has started). An entity published earlier is stale when its owner is no longer in `owners`, or
    its owner is in `declared` without it. `republish` asks for every config again (after a reconnect).
    """

    owners: list[str]
    declared: dict[str, list[DeclaredEntity]]
    republish: bool = False


def declared(entity: Entity, entity_id: str) -> DeclaredEntity:
    """`entity` ready to publish, to become `<component>.<entity_id>` in Home Assistant (see `discovery_payload`)."""
    config = discovery_payload(entity, entity_id)
    return DeclaredEntity(component=entity.component, object_id=entity.object_id, config=config)


_encoder = msgspec.json.Encoder()


def discovery_topic(prefix: str, node_id: str, entity: Entity) -> str:
    return f"{prefix}/{entity.component}/{node_id}/{entity.object_id}/config"


def discovery_payload(entity: Entity, entity_id: str) -> bytes:
    """The discovery config of `entity`, which Home Assistant creates as `<component>.<entity_id>` (`entity_id` made
    a valid one: lower case, `_` between words)."""
    config = msgspec.to_builtins(entity)
    config["object_id"] = slug(entity_id)
    config["default_entity_id"] = f"{entity.component}.{slug(entity_id)}"
    return _encoder.encode(config)


def slug(text: str) -> str:
    """`text` as Home Assistant writes it in an entity id: `Supervisor-VM_status` -> `supervisor_vm_status`."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def title(name: str) -> str:
    """A worker's name as a person reads it, when its class sets no `title`: `batch_scheduler` -> `Batch scheduler`."""
    words = re.sub(r"[_-]+", " ", name).strip()
    return words[:1].upper() + words[1:]
