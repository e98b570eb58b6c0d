"""ha_responder: everything that speaks Home Assistant.

Consumes: the supervisor's bundle of declared entities (local, on `<base>/homeassistant/entities`), Home Assistant's
birth on its status topic, the discovery configs other integrations publish under the discovery prefix and the state
topics they name, the home's own device topics `<devices_prefix>/<type>/<id>/{state,availability}`, requests on
`<base>/ha_responder/request/<action>` (`list_devices`, `get_state`, `set_state`), and automation feedback on
`ha-ai/responses/#`.
Produces: the discovery configs of every declared entity (retained; unchanged ones skipped by hash, stale ones
removed with an empty retained config), replies to requests, commands to devices (`set_state`), and its own
sensors: tracked devices, automation results and failures.
Touches: its state directory (`discovery.json`: the hash of every config it published, so a restart does not
republish what the broker already holds; `automations.json`: the automation results and failure count, so that they
survive a restart).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, ClassVar, Self

import msgspec

from contracts import Command, Context, Message, Subscription, Timer, Worker
from contracts.decoding import BoundedJson
from contracts.homeassistant import DiscoveryBundle, Sensor
from contracts.state import write_atomically
from contracts.topics import publish_topic_problem

_ABBREVIATIONS = {  # the discovery keys this worker reads, by their abbreviated names
    "stat_t": "state_topic",
    "cmd_t": "command_topic",
    "avty_t": "availability_topic",
    "uniq_id": "unique_id",
    "dev": "device",
    "json_attr_t": "json_attributes_topic",
    "o": "origin",
}
_ACTIONS = ("list_devices", "get_state", "set_state")


class HaResponderConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    republish_delay_min_seconds: float = 2.0
    republish_delay_max_seconds: float = 10.0
    track_devices: bool = True
    devices_prefix: str = "home"
    feedback_topic: str = "ha-ai/responses/#"
    feedback_history: int = 10  # results kept per automation
    max_automations: int = 200  # automations whose results are kept; past it, the one heard from longest ago goes
    max_devices: int = 500  # devices tracked at most; more are refused and counted as `devices` errors

    def __post_init__(self) -> None:
        if not 0 <= self.republish_delay_min_seconds <= self.republish_delay_max_seconds:
            raise ValueError(
                "expected 0 <= republish_delay_min_seconds <= republish_delay_max_seconds, got "
                f"{self.republish_delay_min_seconds} and {self.republish_delay_max_seconds}"
            )
        if self.max_automations < 1:
            raise ValueError(f"max_automations: expected an int >= 1, got {self.max_automations}")
        if self.feedback_history < 1:
            raise ValueError(f"feedback_history: expected an int >= 1, got {self.feedback_history}")
        if self.max_devices < 1:
            raise ValueError(f"max_devices: expected an int >= 1, got {self.max_devices}")


class TrackedDevice(msgspec.Struct, kw_only=True):
    """A device seen on the bus: announced by another integration's discovery config, or on the home's topics."""

    id: str  # "<component>/<node>/<object>" for discovered ones, "<type>/<id>" for the home's own
    source: str  # "discovery" | "home"
    component: str
    name: str | None = None
    unique_id: str | None = None
    state_topic: str | None = None
    command_topic: str | None = None
    availability_topic: str | None = None
    state: str | None = None
    available: str | None = None
    updated: float | None = None

    @classmethod
    def from_discovery(cls, device_id: str, component: str, config: dict[str, Any]) -> Self:
        base = config.get("~")

        def text(key: str) -> str | None:
            value = config.get(key)
            return _expand(value, base) if isinstance(value, str) else None

        return cls(
            id=device_id,
            source="discovery",
            component=component,
            name=text("name"),
            unique_id=text("unique_id"),
            state_topic=text("state_topic"),
            command_topic=text("command_topic"),
            availability_topic=text("availability_topic"),
        )


class AutomationResult(msgspec.Struct, kw_only=True):
    automation: str
    success: bool
    message: str | None
    time: float


class Automations(msgspec.Struct, kw_only=True):
    """What is kept of automation feedback (also the saved file)."""

    failures: int = 0
    results: dict[str, list[AutomationResult]] = msgspec.field(default_factory=dict)


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """The body of a request; unknown fields are ignored (it comes from outside)."""

    device: str | None = None
    state: str | None = None


# Everything here decodes comes from other clients of the broker.
_any_decoder: BoundedJson[Any] = BoundedJson(max_bytes=256 * 1024)
_request_decoder: BoundedJson[Request] = BoundedJson(Request, max_bytes=64 * 1024)


class HaResponder(Worker[HaResponderConfig]):
    """Publishes Home Assistant discovery for every declared entity, answers Home Assistant's birth, tracks the
    devices on the bus and the results of automations (see the module docstring)."""

    name = "ha_responder"
    title = "Home Assistant responder"
    example_config: ClassVar[dict[str, Any]] = {"republish_delay_min_seconds": 0.0, "republish_delay_max_seconds": 0.1}
    error_kinds = ("devices",)
    memory_limit_mb = 128  # resident MiB; a section's memory_limit_mb overrides it
    Config = HaResponderConfig

    def __init__(self) -> None:
        self._bundle: DiscoveryBundle | None = None
        self._published: dict[str, dict[str, str]] = {}  # discovery topic -> {"owner", "hash"}
        self._cache_path = Path()
        self._pending_birth: Timer | None = None
        self._devices: dict[str, TrackedDevice] = {}
        self._by_state_topic: dict[str, set[str]] = {}
        self._by_availability_topic: dict[str, set[str]] = {}
        self._subscribed: set[str] = set()
        self._refused = 0  # devices not tracked: max_devices reached
        self._automations = Automations()
        self._automations_path = Path()

    def subscriptions(self) -> list[Subscription]:
        site, config = self.site, self.config
        bundle = Subscription(  # from the supervisor only, never from the broker
            site.entities_topic, local=True, handler=self._bundle_came, type=DiscoveryBundle, format="msgpack"
        )
        subscriptions = [
            bundle,
            Subscription(site.homeassistant_status_topic, qos=1, handler=self._home_assistant_announced),
            Subscription(f"{self._topic('request')}/+", qos=1, commands=True, handler=self._request),
            Subscription(config.feedback_topic, qos=1, handler=self._feedback),
        ]
        if config.track_devices:
            subscriptions += [
                Subscription(f"{site.discovery_prefix}/+/+/config", handler=self._discovered),
                Subscription(f"{site.discovery_prefix}/+/+/+/config", handler=self._discovered),
                Subscription(f"{config.devices_prefix}/+/+/state", handler=self._device_message),
                Subscription(f"{config.devices_prefix}/+/+/availability", handler=self._device_message),
            ]
        return subscriptions

    def example_message(self) -> tuple[str, bytes]:
        light = {"name": "Kitchen", "stat_t": "home/light/kitchen/state", "uniq_id": "kitchen"}
        return f"{self.site.discovery_prefix}/light/zb/kitchen/config", json.dumps(light).encode()

    def _topic(self, *levels: str) -> str:
        return self.site.worker_own_topic(self.name, *levels)

    # Lifecycle ------------------------------------------------------------------------------------------------------

    def on_start(self, ctx: Context) -> None:
        self._cache_path = ctx.state_dir / "discovery.json"
        self._published = _load_cache(self._cache_path, ctx)
        self._automations_path = ctx.state_dir / "automations.json"
        self._automations = _load_automations(self._automations_path, ctx)
        ctx.declare(
            [
                Sensor(
                    object_id="devices",
                    name="Tracked devices",
                    state_topic=self._topic("devices"),
                    state_class="measurement",
                    icon="mdi:devices",
                ),
                Sensor(
                    object_id="automation_result",
                    name="Last automation result",
                    state_topic=self._topic("automations"),
                    value_template="{{ value_json.last.automation ~ ': ' ~ value_json.last.outcome }}",
                    json_attributes_topic=self._topic("automations"),
                    icon="mdi:robot",
                ),
                Sensor(
                    object_id="automation_failures",
                    name="Automation failures",
                    state_topic=self._topic("automation_failures"),
                    state_class="total_increasing",
                    icon="mdi:robot-confused",
                ),
            ]
        )
        # Every counter has a value from the start (Home Assistant would show "unknown" until the first change).
        self._publish_devices(ctx)
        self._publish_automations(ctx)

    def on_command(self, ctx: Context, command: Command) -> None:
        ctx.log.warning("ignored unknown command %r", command.name)

    # Discovery ------------------------------------------------------------------------------------------------------

    def _bundle_came(self, ctx: Context, bundle: DiscoveryBundle, message: Message) -> None:
        self._bundle = bundle
        self._publish_discovery(ctx, force=bundle.republish)

    def _publish_discovery(self, ctx: Context, force: bool) -> None:
        """Publish every declared config whose hash changed (all of them when `force`), and an empty config for
        every stale one."""
        bundle = self._bundle
        if bundle is None:
            return
        wanted: dict[str, tuple[str, bytes]] = {}
        for owner, entities in bundle.declared.items():
            for entity in entities:
                wanted[entity.topic(self.site.discovery_prefix, self.site.node_id)] = (owner, entity.config)
        changed = False
        for topic, (owner, config) in wanted.items():
            digest = hashlib.sha256(config).hexdigest()
            if force or self._published.get(topic, {}).get("hash") != digest:
                ctx.publish(topic, config, qos=1, retain=True)
                self._published[topic] = {"owner": owner, "hash": digest}
                changed = True
        for topic, record in list(self._published.items()):
            owner = record["owner"]
            if topic not in wanted and (owner not in bundle.owners or owner in bundle.declared):
                ctx.publish(topic, b"", qos=1, retain=True)  # Home Assistant removes the entity
                del self._published[topic]
                changed = True
                ctx.log.info("removed stale entity %s (owner %s)", topic, owner)
        if changed:
            _save_cache(self._cache_path, self._published)

    def _home_assistant_announced(self, ctx: Context, payload: bytes, message: Message) -> None:
        """Home Assistant (re)started: after a random delay (so that a house full of devices does not answer all at
        once), discovery again, then the supervisor's status and availability."""
        if payload.strip().lower() != b"online":
            return
        if self._pending_birth is not None:
            self._pending_birth.cancel()
        delay = random.uniform(self.config.republish_delay_min_seconds, self.config.republish_delay_max_seconds)
        ctx.log.info("Home Assistant is online; republishing discovery in %.1f s", delay)
        self._pending_birth = ctx.call_later(delay, lambda: self._republish_for_home_assistant(ctx))

    def _republish_for_home_assistant(self, ctx: Context) -> None:
        self._pending_birth = None
        self._publish_discovery(ctx, force=True)
        ctx.publish(f"{self.site.request_prefix}/republish", b"", qos=1, local_only=True)

    # Devices on the bus -----------------------------------------------------------------------------------------------

    def _discovered(self, ctx: Context, payload: bytes, message: Message) -> None:
        levels = message.topic[len(self.site.discovery_prefix) + 1 :].split("/")[:-1]  # component, [node,] object
        if len(levels) == 3 and levels[1] == self.site.node_id:
            return  # one of ours (under MQTT 3.1.1 the broker sends our own publications back)
        device_id = "/".join(levels)
        if not payload:
            if self._devices.pop(device_id, None) is not None:
                self._publish_devices(ctx)
            return
        config = _any_decoder.decode(payload)
        if not isinstance(config, dict):
            raise msgspec.ValidationError(f"expected a JSON object, got {type(config).__name__}")
        config = {_ABBREVIATIONS.get(key, key): value for key, value in config.items()}
        origin = config.get("origin")
        if isinstance(origin, dict) and origin.get("name") == self.site.origin().name:
            return  # another supervisor's (on another host): not a device of the home
        device = TrackedDevice.from_discovery(device_id, levels[0], config)
        self._track(ctx, device)

    def _device_message(self, ctx: Context, payload: bytes, message: Message) -> None:
        topic = message.topic
        prefix = f"{self.config.devices_prefix}/"
        levels = topic[len(prefix) :].split("/")  # <type>/<id>/<state|availability>
        if topic.startswith(prefix) and len(levels) == 3 and levels[2] in ("state", "availability"):
            device_id = f"{levels[0]}/{levels[1]}"
            if device_id not in self._devices:
                base = f"{prefix}{device_id}"
                self._track(
                    ctx,
                    TrackedDevice(
                        id=device_id,
                        source="home",
                        component=levels[0],
                        state_topic=f"{base}/state",
                        command_topic=f"{base}/set",
                        availability_topic=f"{base}/availability",
                    ),
                )
        text = payload.decode(errors="replace")
        for device_id in self._by_state_topic.get(topic, ()):
            device = self._devices.get(device_id)
            if device is not None:
                device.state, device.updated = text, ctx.now()
        for device_id in self._by_availability_topic.get(topic, ()):
            device = self._devices.get(device_id)
            if device is not None:
                device.available = text

    def _track(self, ctx: Context, device: TrackedDevice) -> None:
        """Follow `device`: its topics come from other clients, so only plain topics outside the supervisor's own
        tree are taken (a config naming `#` as its state topic would pull in the whole broker, one naming a control
        topic as its command topic would let set_state stop a worker), and at most `max_devices` devices."""
        known = self._devices.get(device.id)
        if known is None and len(self._devices) >= self.config.max_devices:
            self._refused += 1
            if self._refused % 100 == 1:
                ctx.report_error(
                    "devices",
                    f"tracking {len(self._devices)} devices, the most allowed (max_devices); "
                    f"refused {device.id!r} ({self._refused} so far)",
                )
            return
        for field in ("state_topic", "command_topic", "availability_topic"):
            topic = getattr(device, field)
            problem = topic is not None and self._topic_problem(topic)
            if problem:
                ctx.log.warning("device %s: ignored its %s: %s", device.id, field, problem)
                setattr(device, field, None)
        if known is not None:
            device.state, device.available, device.updated = known.state, known.available, known.updated
        self._devices[device.id] = device
        indexes = ((device.state_topic, self._by_state_topic), (device.availability_topic, self._by_availability_topic))
        for topic, index in indexes:
            if topic is None:
                continue
            index.setdefault(topic, set()).add(device.id)
            if device.source == "discovery" and topic not in self._subscribed:
                self._subscribed.add(topic)
                ctx.subscribe(Subscription(topic, handler=self._device_message))
        if known is None:
            self._publish_devices(ctx)

    def _topic_problem(self, topic: str) -> str | None:
        """Why a device's topic is not followed or published to, or None when it may be."""
        problem = publish_topic_problem(topic)
        if problem is None and (topic == self.site.base_topic or topic.startswith(f"{self.site.base_topic}/")):
            problem = f"the topic {topic!r} is the supervisor's own"
        return problem

    def _publish_devices(self, ctx: Context) -> None:
        ctx.publish(self._topic("devices"), str(len(self._devices)), qos=1, retain=True)

    # Requests -------------------------------------------------------------------------------------------------------

    def _request(self, ctx: Context, payload: bytes, message: Message) -> None:
        action = message.topic.rsplit("/", 1)[1]
        try:
            answer = {"ok": True, **self._carry_out(ctx, action, payload)}
        except LookupError as exc:
            answer = {"ok": False, "error": str(exc.args[0])}
        topic = message.response_topic or self._topic("response", action)
        ctx.publish(topic, json.dumps(answer), qos=1)

    def _carry_out(self, ctx: Context, action: str, payload: bytes) -> dict[str, Any]:
        if action not in _ACTIONS:
            raise LookupError(f"unknown action {action!r}; expected one of: {', '.join(_ACTIONS)}")
        if action == "list_devices":
            return {"devices": [msgspec.to_builtins(d) for d in sorted(self._devices.values(), key=lambda d: d.id)]}
        try:
            request = _request_decoder.decode(payload or b"{}")
        except msgspec.DecodeError as exc:
            raise LookupError(f'expected JSON like {{"device": "<id>"}}, got {payload[:80]!r}: {exc}') from None
        device = self._devices.get(request.device or "")
        if device is None:
            raise LookupError(f"no device {request.device!r}; list_devices names the known ones")
        if action == "get_state":
            return {"device": msgspec.to_builtins(device)}
        if request.state is None:
            raise LookupError('set_state: expected {"device": "<id>", "state": "<state>"}')
        if device.command_topic is None:
            raise LookupError(f"device {device.id!r} takes no commands (its config has no command_topic)")
        ctx.publish(device.command_topic, request.state, qos=1)
        return {"device": device.id, "command_topic": device.command_topic, "state": request.state}

    # Automation feedback --------------------------------------------------------------------------------------------

    def _feedback(self, ctx: Context, payload: bytes, message: Message) -> None:
        body = _any_decoder.decode(payload) if payload.strip() else {}
        if not isinstance(body, dict):
            raise msgspec.ValidationError(f"expected a JSON object, got {type(body).__name__}")
        automation = str(body.get("automation_id") or body.get("automation") or message.topic.rsplit("/", 1)[1])[:200]
        outcome = body.get("success", body.get("status", True))
        success = outcome is True or str(outcome).lower() in ("ok", "success", "succeeded", "true")
        detail = body.get("message") or body.get("error")
        result = AutomationResult(
            automation=automation, success=success, message=str(detail)[:1000] if detail else None, time=ctx.now()
        )
        kept = self._automations
        if automation not in kept.results and len(kept.results) >= self.config.max_automations:
            oldest = min(kept.results, key=lambda name: max((r.time for r in kept.results[name]), default=0.0))
            del kept.results[oldest]
        history = kept.results.setdefault(automation, [])
        history.append(result)
        del history[: -self.config.feedback_history]
        if not success:
            kept.failures += 1
        write_atomically(self._automations_path, msgspec.json.encode(kept))
        self._publish_automations(ctx, result)

    def _publish_automations(self, ctx: Context, last: AutomationResult | None = None) -> None:
        """The failure count, and (when there is one) the document of automation results, both retained."""
        kept = self._automations
        ctx.publish(self._topic("automation_failures"), str(kept.failures), qos=1, retain=True)
        if last is None:
            newest = [history[-1] for history in kept.results.values() if history]
            if not newest:
                return  # no result yet: "Last automation result" stays unknown
            last = max(newest, key=lambda r: r.time)
        document = {
            "last": {
                "automation": last.automation,
                "outcome": "ok" if last.success else "failed",
                "message": last.message,
            },
            "failures": kept.failures,
            "automations": {name: [msgspec.to_builtins(r) for r in rs] for name, rs in kept.results.items()},
        }
        ctx.publish(self._topic("automations"), json.dumps(document), qos=1, retain=True)


def _expand(topic: str, base: object) -> str:
    """Home Assistant's `~` shorthand: a topic starting or ending with `~` has it replaced by the base topic."""
    if isinstance(base, str):
        if topic.startswith("~"):
            return base + topic[1:]
        if topic.endswith("~"):
            return topic[:-1] + base
    return topic


def _load_cache(path: Path, ctx: Context) -> dict[str, dict[str, str]]:
    try:
        return msgspec.json.decode(path.read_bytes(), type=dict[str, dict[str, str]])
    except FileNotFoundError:
        return {}
    except (OSError, msgspec.DecodeError) as exc:  # a damaged cache only costs one full republish
        ctx.log.warning("ignoring the discovery cache %s: %s", path, exc)
        return {}


def _load_automations(path: Path, ctx: Context) -> Automations:
    try:
        return msgspec.json.decode(path.read_bytes(), type=Automations)
    except FileNotFoundError:
        return Automations()
    except (OSError, msgspec.DecodeError) as exc:
        ctx.log.warning("ignoring the saved automation results %s: %s", path, exc)
        return Automations()


def _save_cache(path: Path, published: dict[str, dict[str, str]]) -> None:
    write_atomically(path, msgspec.json.encode(published))
