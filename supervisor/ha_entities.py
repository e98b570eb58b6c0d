"""Home Assistant entities: the supervisor's own, and the bundle of everything declared that goes to ha_responder.

The supervisor's own are a Status sensor on the supervisor's device and, on each worker's device, whether it runs,
its errors, restarts and last crash, and a Restart button. The entities about a worker follow the supervisor's
availability only: a worker that is down must show as not running, and its Restart button must stay pressable.

`EntityBundle` keeps what the supervisor and each worker declared and sends it all (local-only, as a
`DiscoveryBundle` on `Site.entities_topic`) to the worker that publishes discovery, at the end of a wake-up in
which something changed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from contracts import Publish, Site
from contracts.homeassistant import (
    Availability,
    BinarySensor,
    Button,
    DeclaredEntity,
    DiscoveryBundle,
    Entity,
    Sensor,
    declared,
)
from supervisor import control

Send = Callable[[Publish], object]


class EntityBundle:
    """What the supervisor (`owner` "supervisor") and each worker declared, sent to ha_responder when it changed."""

    def __init__(self, site: Site, workers: Mapping[str, str | None], send: Send) -> None:
        """`workers` maps every configured worker to its title; `send` delivers a local-only publication."""
        self.site = site
        self.send = send
        self.declared: dict[str, list[DeclaredEntity]] = {}
        self._due: bool | None = None  # None: nothing to send; else whether to ask for a full republish
        self.set_workers(workers)
        self._due = None  # sent once a worker starts (it may be the one that publishes discovery)

    def set_workers(self, workers: Mapping[str, str | None]) -> None:
        """The configured workers are now `workers` (name -> title): the entities of a worker no longer there go
        (ha_responder removes an owner's entities when the owner leaves the bundle), a new one's come."""
        self.owners = [control.NAME, *workers]
        kept = {owner: entities for owner, entities in self.declared.items() if owner in workers}
        self.declared = {control.NAME: supervisor_entities(self.site, workers), **kept}
        self.send_soon()

    def declare(self, owner: str, entities: list[DeclaredEntity] | None) -> None:
        """`owner` declared `entities`; None: it started (what it declared in its start came before)."""
        if entities is None:
            self.declared.setdefault(owner, [])
            self.send_soon()  # it may be the one that publishes discovery
        elif self.declared.get(owner) != entities:
            self.declared[owner] = entities
            self.send_soon()

    def send_soon(self, republish: bool = False) -> None:
        """Send the bundle at the end of this wake-up; `republish`: ask for every config again."""
        self._due = republish or bool(self._due)

    def flush(self) -> None:
        if self._due is None:
            return
        bundle = DiscoveryBundle(owners=self.owners, declared=self.declared, republish=self._due)
        self._due = None
        self.send(Publish(topic=self.site.entities_topic, payload=msgspec.msgpack.encode(bundle), local_only=True))


def node_id(client_id: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]", "_", client_id)


def supervisor_entities(site: Site, workers: Mapping[str, str | None]) -> list[DeclaredEntity]:
    """Every entity of the supervisor itself; `workers` maps each worker's name to its title (None: from the name)."""
    node, status = site.node_id, site.status_topic
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
    node, status, of_worker = site.node_id, site.status_topic, f"value_json.workers['{worker}']"
    crash = site.last_crash_topic(worker)
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
