"""The supervisor's own Home Assistant entities: a Status sensor on the supervisor's device and, on each worker's
device, whether it runs, its errors, restarts and last crash, and a Restart button.

The entities about a worker follow the supervisor's availability only: a worker that is down must show as not
running, and its Restart button must stay pressable. They are declared like a worker's and published by the
ha_responder worker with the rest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from contracts import Site
from contracts.homeassistant import Availability, BinarySensor, Button, DeclaredEntity, Entity, Sensor, declared


def node_id(client_id: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]", "_", client_id)


def last_crash_topic(site: Site, worker: str) -> str:
    """Where the supervisor publishes (retained) the time and cause of `worker`'s last crash."""
    return f"{site.base_topic}/worker/{worker}/last_crash"


def supervisor_entities(site: Site, workers: Mapping[str, str | None]) -> list[DeclaredEntity]:
    """Every entity of the supervisor itself; `workers` maps each worker's name to its title (None: from the name)."""
    node, status = site.node_id, f"{site.base_topic}/status"
    own: list[Entity] = [
        Sensor(
            object_id=f"{node}_status",
            unique_id=f"{node}_status",
            name="Status",
            state_topic=status,
            value_template="{{ value_json.status }}",
            options=["ok", "degraded", "error", "stopped"],
            device_class="enum",
            json_attributes_topic=status,
            json_attributes_template="{{ {'problems': value_json.problems, 'mqtt': value_json.mqtt} | tojson }}",
            device=site.supervisor_device(),
            origin=site.origin(),
            availability=[Availability(topic=site.availability_topic)],
            icon="mdi:heart-pulse",
        )
    ]
    for worker, worker_title in workers.items():
        own += _about_worker(site, worker, worker_title)
    return [declared(entity, entity.object_id) for entity in own]


def _about_worker(site: Site, worker: str, worker_title: str | None) -> list[Entity]:
    """The supervisor's entities on `worker`'s device: Running, Errors, Restarts, Last crash and Restart."""
    node, status, of_worker = site.node_id, f"{site.base_topic}/status", f"value_json.workers['{worker}']"
    crash = last_crash_topic(site, worker)
    common: dict[str, Any] = {
        "device": site.worker_device(worker, worker_title),
        "origin": site.origin(),
        "availability": [Availability(topic=site.availability_topic)],
    }
    entities: list[Entity] = [
        BinarySensor(
            object_id="running",
            name="Running",
            state_topic=status,
            device_class="running",
            value_template=f"{{{{ 'ON' if {of_worker}.state == 'running' else 'OFF' }}}}",
            **common,
        ),
        Sensor(
            object_id="errors",
            name="Errors",
            state_topic=status,
            value_template=f"{{{{ {of_worker}.error_count }}}}",
            state_class="total_increasing",
            entity_category="diagnostic",
            icon="mdi:alert-circle",
            **common,
        ),
        Sensor(
            object_id="restarts",
            name="Restarts",
            state_topic=status,
            value_template=f"{{{{ {of_worker}.restarts }}}}",
            state_class="total_increasing",
            entity_category="diagnostic",
            icon="mdi:restart",
            **common,
        ),
        Sensor(
            object_id="last_crash",
            name="Last crash",
            state_topic=crash,
            value_template="{{ value_json.time }}",
            device_class="timestamp",
            json_attributes_topic=crash,
            entity_category="diagnostic",
            icon="mdi:alert-octagon",
            **common,
        ),
        Button(
            object_id="restart",
            name="Restart",
            command_topic=site.command_topic(worker, "restart"),
            device_class="restart",
            entity_category="config",
            icon="mdi:restart",
            **common,
        ),
    ]
    return [
        msgspec.structs.replace(
            e, object_id=f"{node}_{worker}_{e.object_id}", unique_id=f"{node}_{worker}_{e.object_id}"
        )
        for e in entities
    ]
