"""The supervisor's own Home Assistant entities: one device with, per worker, a running binary_sensor, errors
and restarts sensors, and a restart button.

The running sensor and the restart button follow the supervisor's availability only: a worker that is down must
show as not running, and its restart button must stay pressable. They are declared like a worker's and published by
the ha_responder worker with the rest.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable

from contracts import Site
from contracts.homeassistant import (
    Availability,
    BinarySensor,
    Button,
    Device,
    Entity,
    Origin,
    Sensor,
)


def node_id(client_id: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]", "_", client_id)


def supervisor_device_name() -> str:
    """The supervisor's device as Home Assistant shows it."""
    return f"MQTT home supervisor ({socket.gethostname()})"


def supervisor_entities(site: Site, workers: Iterable[str]) -> list[Entity]:
    node, base, version = site.node_id, site.base_topic, site.sw_version
    device = Device(
        identifiers=[node],
        name=supervisor_device_name(),
        manufacturer="mqtt-home-supervisor",
        model="supervisor",
        sw_version=version,
    )
    origin = Origin(name="mqtt-home-supervisor", sw_version=version)
    available = [Availability(topic=site.availability_topic)]
    status = f"{base}/status"
    entities: list[Entity] = [
        Sensor(
            object_id=f"{node}_status",
            unique_id=f"{node}_status",
            name="Status",
            state_topic=status,
            value_template="{{ value_json.status }}",
            options=["ok", "degraded", "error", "stopped"],
            device_class="enum",
            json_attributes_topic=status,
            json_attributes_template="{{ value_json.mqtt | tojson }}",
            device=device,
            origin=origin,
            availability=available,
            icon="mdi:heart-pulse",
        ),
    ]
    for worker in workers:
        of_worker = f"value_json.workers['{worker}']"
        entities += [
            Sensor(
                object_id=f"{node}_{worker}_{what}",
                unique_id=f"{node}_{worker}_{what}",
                name=f"{worker} {what}",
                state_topic=status,
                value_template=f"{{{{ {of_worker}.{field} }}}}",
                state_class="total_increasing",
                entity_category="diagnostic",
                icon=icon,
                device=device,
                origin=origin,
                availability=available,
            )
            for what, field, icon in (
                ("errors", "error_count", "mdi:alert-circle"),
                ("restarts", "restarts", "mdi:restart"),
            )
        ]
        entities += [
            BinarySensor(
                object_id=f"{node}_{worker}_running",
                unique_id=f"{node}_{worker}_running",
                name=f"{worker} running",
                state_topic=status,
                device_class="running",
                value_template=f"{{{{ 'ON' if {of_worker}.state == 'running' else 'OFF' }}}}",
                device=device,
                origin=origin,
                availability=available,
            ),
            Button(
                object_id=f"{node}_{worker}_restart",
                unique_id=f"{node}_{worker}_restart",
                name=f"{worker} restart",
                command_topic=site.command_topic(worker, "restart"),
                device_class="restart",
                entity_category="config",
                device=device,
                origin=origin,
                availability=available,
            ),
        ]
    return entities

