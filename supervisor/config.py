"""Configuration: the TOML file, environment overrides and secrets, decoded into typed, validated settings.

Every table forbids unknown keys. Every error is a `ConfigError` naming the file (or environment variable), the
dotted key, what was expected and what was found, in one line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import socket
import stat
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from contracts import NoConfig, Worker
from contracts.homeassistant import title
from contracts.topics import publish_topic_problem
from supervisor.errors import ConfigError
from supervisor.registry import discover
from supervisor.secrets import Secret

T = TypeVar("T")
_YEAR = 365 * 86400
Seconds = Annotated[float, msgspec.Meta(gt=0, le=_YEAR)]  # a duration: above zero, at most a year
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every config table: immutable, keyword-only, unknown keys rejected."""


class SupervisorConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # `{host}` in it stands for this host's name (one config file for several hosts: see share_group).
    base_topic: str = "supervisor"
    # Empty: $STATE_DIRECTORY (set by systemd's StateDirectory=) or ./state. Relative paths are from the cwd.
    state_dir: str = ""
    shutdown_timeout_seconds: Seconds = 10.0
    # <base>/status is published when it changes (at most once a second) and at least this often.
    status_interval_seconds: Seconds = 60.0
    worker_packages: list[str] = msgspec.field(default_factory=lambda: ["workers"])
    # How worker processes start: "fork" (fastest, smallest: safe here because the supervisor is one thread and
    # each child releases every descriptor it inherits, the MQTT socket first), "forkserver" (a clean server
    # process with the worker modules preloaded) or "spawn" (a fresh interpreter per worker; slowest, largest).
    start_method: Literal["fork", "forkserver", "spawn"] = "fork"
    # The outbox's durability: "off" survives any crash of the supervisor with no fsync; "normal" also a power cut
    # (but each WAL checkpoint's fsync stalls the loop); "full" fsyncs every write. See supervisor/outbox.py.
    outbox_sync: Literal["off", "normal", "full"] = "off"
    # Log a warning while the supervisor's own resident memory is above this (MiB); 0: never.
    memory_warning_mb: Annotated[int, msgspec.Meta(ge=0, le=1_048_576)] = 200
    # Watch the config file and the worker modules, and reload when one is saved (for writing workers; off: reload
    # on SIGHUP, `systemctl reload`, or `ctl reload`).
    reload_on_change: bool = False
    # Worker log lines at this level and above are published on <base>/log/<worker> too (`ctl tail`); "OFF": none.
    mqtt_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "OFF"] = "WARNING"


class TlsConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


class MqttConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 1883
    # Empty: "supervisor-<hostname>", stable across restarts (persistent session) and unique per host.
    client_id: str = ""
    protocol: Literal[5, 311] = 5
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    keepalive_seconds: Annotated[int, msgspec.Meta(ge=5, le=65535)] = 30
    connect_timeout_seconds: Seconds = 3.0
    reconnect_min_seconds: Seconds = 0.1
    reconnect_max_seconds: Seconds = 0.5
    session_expiry_seconds: Annotated[int, msgspec.Meta(ge=0, le=4294967295)] = 86400  # MQTT: four bytes
    message_expiry_seconds: Annotated[int, msgspec.Meta(ge=60, le=3600)] = 300
    # Empty: "<base_topic>/availability".
    availability_topic: str = ""
    birth_payload: str = "online"
    will_payload: str = "offline"
    # MQTT 5: how many unacknowledged QoS 1/2 messages the broker may send at once (they are acknowledged only once
    # handled, so this bounds what the supervisor holds in memory). The broker's own limit applies too.
    receive_maximum: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1000
    # Larger inbound payloads are dropped, counted and logged.
    max_payload_bytes: Annotated[int, msgspec.Meta(ge=1, le=268435455)] = 1048576  # MQTT's largest packet
    tls: TlsConfig = TlsConfig()


class MetricsConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    bind: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9388


class HomeAssistantConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    discovery_prefix: str = "homeassistant"
    status_topic: str = "homeassistant/status"
    support_url: str = ""  # Home Assistant's "support URL" of the entities' origin; empty: the status page


class ConfigFile(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    supervisor: SupervisorConfig = SupervisorConfig()
    mqtt: MqttConfig = MqttConfig()
    metrics: MetricsConfig = MetricsConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    workers: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)


class WorkerSupervision(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The keys of a `[workers.<name>]` section that belong to the supervisor, not to the worker."""

    enabled: bool = True
    # The worker to run under this section's name (default: the section name), to run one worker twice.
    worker: str | None = None
    restart: Literal["permanent", "transient", "temporary"] = "permanent"
    max_restarts: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 5
    restart_window_seconds: Seconds = 60.0
    # Empty: [supervisor] shutdown_timeout_seconds.
    shutdown_timeout_seconds: Seconds | None = None
    significant: bool = False
    backoff_min_seconds: Seconds = 0.5
    backoff_max_seconds: Seconds = 30.0
    stable_after_seconds: Seconds = 30.0
    heartbeat_timeout_seconds: Seconds = 30.0
    message_deadline_seconds: Seconds = 60.0
    # Messages handed to the worker process and not yet handled, and messages held for it in the supervisor.
    max_inflight: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 100
    max_queued: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10000
    # A message in the worker's handler during this many of its deaths goes to <base>/dead_letter instead.
    dead_letter_after_crashes: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    # Drop a message whose publication id the worker handled within this many seconds (0: off), remembering at most
    # dedupe_max_entries ids.
    dedupe_seconds: Annotated[float, msgspec.Meta(ge=0, le=_YEAR)] = 0.0
    dedupe_max_entries: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10000
    # Resource limits, applied in the worker's process (see supervisor.worker_process); unset: the worker class's
    # default memory limit, the supervisor's niceness and descriptor limit.
    memory_limit_mb: Annotated[int, msgspec.Meta(ge=16, le=1_048_576)] | None = None
    cpu_nice: Annotated[int, msgspec.Meta(ge=0, le=19)] | None = None
    max_open_files: Annotated[int, msgspec.Meta(ge=16, le=1_048_576)] | None = None
    # Share this worker's input with the same worker on other supervisors (other hosts): its subscriptions are made
    # as MQTT 5 shared subscriptions `$share/<group>/<filter>`, so the broker gives each message to one of them.
    # A group name, or true for the section's name. Needs [mqtt] protocol = 5.
    share_group: str | bool = False


SUPERVISION_KEYS = frozenset(WorkerSupervision.__struct_fields__)


@dataclass(frozen=True)
class WorkerSettings:
    name: str
    worker_class: type[Worker]  # type: ignore[type-arg]
    supervision: WorkerSupervision
    config: msgspec.Struct
    # The secret variables its section names (keys ending in `_env`) that are set: its processes get these only.
    environment: dict[str, Secret] = field(default_factory=dict)
    # Why its worker cannot be loaded (its module is broken): it never starts, and shows as failed until a reload
    # finds the module fixed. None for every worker that can run.
    load_error: str | None = None

    @property
    def title(self) -> str:
        """How a person reads its name (its Home Assistant device's): its class's `title` when the section is
        named after the class, else from the section's name (`scraper_news` of `worker = "scraper"`: "Scraper
        news")."""
        own = self.worker_class.title if self.name == self.worker_class.name else None
        return own or title(self.name)

    @property
    def share_group(self) -> str | None:
        """The shared-subscription group its subscriptions are made in (`share_group`), or None."""
        group = self.supervision.share_group
        if group is True:
            return self.name
        return group or None

    @property
    def memory_limit_mb(self) -> int | None:
        """Its memory limit: its section's, else its worker class's default."""
        limit = self.supervision.memory_limit_mb
        return limit if limit is not None else self.worker_class.memory_limit_mb

    @property
    def secret_names(self) -> list[str]:
        """The environment variables its section names in keys ending in `_env`, set or not."""
        return [v for k, v in msgspec.structs.asdict(self.config).items() if k.endswith("_env") and isinstance(v, str)]


@dataclass(frozen=True)
class Settings:
    """Everything the supervisor needs to run, resolved: defaults filled, overrides applied, secrets read."""

    path: Path
    supervisor: SupervisorConfig
    mqtt: MqttConfig
    password: Secret | None
    metrics: MetricsConfig
    homeassistant: HomeAssistantConfig
    state_dir: Path
    workers: tuple[WorkerSettings, ...]
    available_workers: tuple[str, ...]
    # The worker modules that could not be used (module name -> the error), skipped: see `registry.discover`.
    broken_modules: dict[str, str] = field(default_factory=dict)
    # At a reload, the worker modules whose new version is broken (module name -> the error): the one loaded
    # before stays in use.
    kept_modules: dict[str, str] = field(default_factory=dict)
    # Every environment variable holding a secret: the MQTT password's, and those any worker section names (a
    # disabled one's too); and the values of those that were set, kept for a reload (they leave the environment).
    secret_variables: frozenset[str] = frozenset()
    secrets: dict[str, Secret] = field(default_factory=dict)


class Unloadable(Worker[NoConfig]):
    """Stands in for the worker of a section whose module cannot be loaded (`WorkerSettings.load_error`): its slot
    shows as failed and never starts a process."""

    name = "unloadable"


def load(
    path: str | Path,
    environ: dict[str, str] | None = None,
    strict: bool = True,
    reloading: bool = False,
    connection_only: bool = False,
) -> Settings:
    """Read, validate and resolve the config file at `path`; raises ConfigError. Not `strict` (a running
    supervisor), a section whose worker's module cannot be loaded is not an error: that worker gets `load_error`,
    to show as failed while the others run. `reloading` (a running supervisor's reload): worker modules changed on
    disk are imported again, a broken new version leaving the loaded one in use (`Settings.kept_modules`).
    `connection_only` (the command line's `ctl`): only `[supervisor]` and `[mqtt]` are read, no worker, so that
    `ctl reload` reaches the supervisor even when a worker section is wrong (the supervisor then says what is)."""
    path = Path(path)
    environ = dict(os.environ) if environ is None else environ
    source = str(path)
    raw = _read_toml(path)
    if connection_only:
        raw = {table: raw[table] for table in ("supervisor", "mqtt") if table in raw}
    _check_finite(raw, source, "")
    file = _convert(raw, ConfigFile, source, "")
    if "{host}" in file.supervisor.base_topic:  # one config file for several hosts, each its own topics
        base_topic = file.supervisor.base_topic.replace("{host}", host_slug())
        file = msgspec.structs.replace(file, supervisor=msgspec.structs.replace(file.supervisor, base_topic=base_topic))
    mqtt = _resolve_mqtt(file.mqtt, file.supervisor.base_topic, environ, source)
    _check_values(file, mqtt, source)
    broken: dict[str, str] = {}
    kept: dict[str, str] | None = {} if reloading else None
    available = {} if connection_only else discover(file.supervisor.worker_packages, broken, kept)
    sections = file.workers.items()
    workers = tuple(
        w
        for w in (_worker_settings(name, section, available, broken, source, strict) for name, section in sections)
        if w
    )
    workers = tuple(
        dataclasses.replace(w, environment={n: Secret(environ[n]) for n in w.secret_names if n in environ})
        for w in workers
    )
    shared = [w.name for w in workers if w.supervision.enabled and w.share_group]
    if shared and mqtt.protocol != 5:
        raise ConfigError(
            source,
            f"[workers.{shared[0]}] share_group",
            "shared subscriptions need MQTT 5; set [mqtt] protocol = 5 (Mosquitto 2.0 and later support them)",
        )
    if shared and file.supervisor.base_topic == SupervisorConfig().base_topic:
        raise ConfigError(
            source,
            "[supervisor] base_topic",
            f"with share_group ([workers.{shared[0]}]) several hosts run this worker, and each needs topics of its "
            'own (status, availability, requests): set base_topic = "supervisor/{host}" (the host name) or another '
            "name per host",
        )
    state_dir = file.supervisor.state_dir or environ.get("STATE_DIRECTORY", "").split(":")[0] or "state"
    secret_variables = frozenset(
        {"MQTT_PASSWORD", *([file.mqtt.password_env] if file.mqtt.password_env else [])}
        | {name for w in workers for name in w.secret_names}
    )
    return Settings(
        path=path,
        supervisor=file.supervisor,
        mqtt=mqtt,
        password=_password(file.mqtt, environ, source),
        metrics=file.metrics,
        homeassistant=file.homeassistant,
        state_dir=Path(state_dir).absolute(),
        workers=tuple(w for w in workers if w.supervision.enabled),
        secret_variables=secret_variables,
        secrets={name: Secret(environ[name]) for name in sorted(secret_variables) if name in environ},
        available_workers=tuple(available),
        broken_modules=broken,
        kept_modules=kept or {},
    )


_MAX_FILE_BYTES = 1024 * 1024


def _read_toml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(source, "", "no such file; pass an existing file with --config") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read it: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(source, "", "expected a TOML file, got a directory")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        raise ConfigError(source, "", "expected a regular TOML file, got a pipe, socket or device")
    if info.st_size > _MAX_FILE_BYTES:
        raise ConfigError(source, "", f"expected a TOML file of at most 1 MiB, got {info.st_size} bytes")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise ConfigError(source, "", "permission denied reading the file") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read it: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            source, "", f"expected UTF-8 text, got byte {data[exc.start]:#04x} at offset {exc.start}"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"invalid TOML: {exc}") from None


def _check_finite(value: Any, source: str, where: str) -> None:
    """Refuse nan and inf anywhere in the file: no setting means either."""
    if isinstance(value, float) and not math.isfinite(value):
        table, _, key = where.rpartition(".")
        raise ConfigError(source, f"[{table}] {key}" if table else key, f"expected a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, source, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(item, source, f"{where}[{index}]")


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _is_web_address(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in url)


def _check_values(file: ConfigFile, mqtt: MqttConfig, source: str) -> None:
    """What the types cannot say: topics that can be published to, an address to bind, files to read, names."""
    base = file.supervisor.base_topic
    topics = {
        "[supervisor] base_topic": base,
        "[mqtt] availability_topic": mqtt.availability_topic,
        "[homeassistant] discovery_prefix": file.homeassistant.discovery_prefix,
        "[homeassistant] status_topic": file.homeassistant.status_topic,
    }
    for key, topic in topics.items():
        problem = publish_topic_problem(topic)
        if problem is not None:
            raise ConfigError(source, key, f"expected an MQTT topic without wildcards, but {problem}")
    if base.startswith("$"):
        raise ConfigError(
            source,
            "[supervisor] base_topic",
            f"expected a topic not starting with '$' (the broker's own), got {base!r}",
        )
    url = file.homeassistant.support_url
    if url and not _is_web_address(url):
        raise ConfigError(  # Home Assistant would drop every entity whose origin has such a url
            source, "[homeassistant] support_url", f"expected an http:// or https:// address, got {url!r}"
        )
    if not mqtt.host.strip() or any(c.isspace() or c == "\0" for c in mqtt.host):
        raise ConfigError(source, "[mqtt] host", f"expected a host name or address, got {mqtt.host!r}")
    if not mqtt.client_id or "\0" in mqtt.client_id:
        raise ConfigError(source, "[mqtt] client_id", f"expected a non-empty client id, got {mqtt.client_id!r}")
    try:
        ipaddress.ip_address(file.metrics.bind)
    except ValueError:
        raise ConfigError(
            source,
            "[metrics] bind",
            f"expected an IP address such as 127.0.0.1, 0.0.0.0 or ::, got {file.metrics.bind!r}",
        ) from None
    paths = {"[supervisor] state_dir": file.supervisor.state_dir, "[mqtt] password_file": mqtt.password_file or ""}
    for key, value in paths.items():
        if "\0" in value:
            raise ConfigError(source, key, f"expected a path, got {value!r} (it holds a NUL character)")
    tls = mqtt.tls
    if tls.enabled:
        for key, name in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file), ("key_file", tls.key_file)):
            if name is not None and not (Path(name).is_file() and os.access(name, os.R_OK)):
                raise ConfigError(source, f"[mqtt.tls] {key}", f"expected a readable file, got {name!r}")
    for name in file.workers:
        if not _SAFE_NAME.fullmatch(name):
            raise ConfigError(
                source,
                f"[workers.{name}]",
                "expected a worker name of ASCII letters, digits, '_' and '-' (it is used in topics and Home "
                "Assistant ids)",
            )


def host_slug() -> str:
    """This host's name as a topic level: lower case, letters, digits, `_` and `-`."""
    return re.sub(r"[^a-z0-9_-]", "_", socket.gethostname().lower())


def _resolve_mqtt(mqtt: MqttConfig, base_topic: str, environ: dict[str, str], source: str) -> MqttConfig:
    changes: dict[str, Any] = {}
    if not mqtt.client_id:
        changes["client_id"] = f"supervisor-{socket.gethostname()}"
    if not mqtt.availability_topic:
        changes["availability_topic"] = f"{base_topic}/availability"
    if host := environ.get("MQTT_BROKER_HOST"):
        changes["host"] = host
    if port := environ.get("MQTT_BROKER_PORT"):
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError("environment", "MQTT_BROKER_PORT", f"expected a port 1..65535, got {port!r}")
        changes["port"] = int(port)
    if username := environ.get("MQTT_USERNAME"):
        changes["username"] = username
    if mqtt.reconnect_max_seconds < mqtt.reconnect_min_seconds:
        raise ConfigError(
            source,
            "[mqtt] reconnect_max_seconds",
            f"expected >= reconnect_min_seconds ({mqtt.reconnect_min_seconds:g}), got {mqtt.reconnect_max_seconds:g}",
        )
    return msgspec.structs.replace(mqtt, **changes)


def _password(mqtt: MqttConfig, environ: dict[str, str], source: str) -> Secret | None:
    if "MQTT_PASSWORD" in environ:
        return Secret(environ["MQTT_PASSWORD"])
    if mqtt.password_env and mqtt.password_file:
        raise ConfigError(source, "[mqtt] password_file", "set password_env or password_file, not both")
    if mqtt.password_env:
        if mqtt.password_env not in environ:
            raise ConfigError(source, "[mqtt] password_env", f"the environment variable {mqtt.password_env} is not set")
        return Secret(environ[mqtt.password_env])
    if mqtt.password_file:
        try:
            return Secret(Path(mqtt.password_file).read_text().rstrip("\r\n"))
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path, or a file that is not UTF-8
            problem = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ConfigError(source, "[mqtt] password_file", f"cannot read {mqtt.password_file}: {problem}") from None
    return None


def _check_reserved_keys(worker_class: type[Worker]) -> None:  # type: ignore[type-arg]
    """A worker's Config may not have a field named like a supervision key: in its section, the key would go to the
    supervisor and the worker would never see it."""
    clash = sorted(SUPERVISION_KEYS & set(worker_class.Config.__struct_fields__))
    if clash:
        where = f"{worker_class.__module__}.{worker_class.__qualname__}"
        raise ConfigError(
            where,
            "Config",
            f"field(s) {', '.join(clash)} have the names of the supervisor's keys of a [workers.<name>] section "
            f"({', '.join(sorted(SUPERVISION_KEYS))}); rename them",
        )


def _worker_settings(
    name: str,
    section: dict[str, Any],
    available: dict[str, type[Worker]],  # type: ignore[type-arg]
    broken: dict[str, str],
    source: str,
    strict: bool = True,
) -> WorkerSettings | None:
    """The settings of section `[workers.<name>]`; None for a disabled section whose worker's module is broken.
    An enabled one is an error when `strict`, else a worker that cannot run (`load_error`)."""
    table = f"workers.{name}"
    supervision_keys = {k: v for k, v in section.items() if k in SUPERVISION_KEYS}
    own_keys = {k: v for k, v in section.items() if k not in SUPERVISION_KEYS}
    supervision = _convert(supervision_keys, WorkerSupervision, source, table)
    kind = supervision.worker or name
    if kind not in available:
        key = f"[{table}] worker" if supervision.worker else f"[{table}]"
        its_module = next((error for module, error in broken.items() if module.rsplit(".", 1)[-1] == kind), None)
        if its_module is not None:
            if not supervision.enabled:
                return None
            error = ConfigError(source, key, f"its worker {kind!r} cannot be loaded: {its_module}")
            if strict:
                raise error
            return WorkerSettings(name, Unloadable, supervision, NoConfig(), load_error=str(error))
        found = ", ".join(available) or "none"
        skipped = f" (skipped, not importable: {', '.join(broken)})" if broken else ""
        raise ConfigError(source, key, f"no worker named {kind!r}; workers found: {found}{skipped}")
    worker_class = available[kind]
    _check_reserved_keys(worker_class)
    if supervision.backoff_max_seconds < supervision.backoff_min_seconds:
        raise ConfigError(
            source,
            f"[{table}] backoff_max_seconds",
            f"expected >= backoff_min_seconds ({supervision.backoff_min_seconds:g}), "
            f"got {supervision.backoff_max_seconds:g}",
        )
    group = supervision.share_group
    if isinstance(group, str) and (not group or any(c in group for c in "/+#") or group.startswith("$")):
        raise ConfigError(
            source, f"[{table}] share_group", f"expected a name without /, +, # or a leading $, or true; got {group!r}"
        )
    config = _convert(own_keys, worker_class.Config, source, table, also_known=SUPERVISION_KEYS)
    return WorkerSettings(name=name, worker_class=worker_class, supervision=supervision, config=config)


# Translating msgspec's validation errors into our one-line messages -------------------------------------------------

_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")


def _convert(
    raw: dict[str, Any], type_: type[T], source: str, table: str, also_known: frozenset[str] = frozenset()
) -> T:
    try:
        return msgspec.convert(raw, type=type_)
    except msgspec.ValidationError as exc:
        raise _config_error(str(exc), raw, type_, source, table, also_known) from None


def _config_error(
    message: str, raw: Any, type_: type, source: str, table: str, also_known: frozenset[str]
) -> ConfigError:
    match = _AT.match(message)
    assert match is not None  # the pattern matches any string
    what, path = match["what"], _split_path(match["path"] or "")
    if unknown := _UNKNOWN.match(what):
        struct = _type_at(type_, path)
        fields = {f.name for f in struct.fields} if isinstance(struct, msgspec.inspect.StructType) else set()
        known = sorted(fields | (also_known if not path else set()))
        hint = f"; expected one of: {', '.join(known)}" if known else ""
        return ConfigError(source, _key(table, [*path, unknown["field"]]), f"unknown key{hint}")
    if missing := _MISSING.match(what):
        return ConfigError(source, _key(table, [*path, missing["field"]]), "missing required key")
    problem = what[0].lower() + what[1:].replace("`", "")
    literal = _type_at(type_, path)
    if isinstance(literal, msgspec.inspect.LiteralType):
        problem = "expected one of " + ", ".join(json.dumps(v) for v in literal.values)
    found = _lookup(raw, path)
    if found is not _ABSENT and not isinstance(found, dict | list):  # the value itself rather than only its type
        problem = problem.split(", got ")[0] + f", got {json.dumps(found, default=str)}"
    return ConfigError(source, _key(table, path), problem)


def _split_path(path: str) -> list[str]:
    """`.mqtt.tls.enabled` or `.sources[0].url` -> ['mqtt', 'tls', 'enabled'] / ['sources', '[0]', 'url'];
    `.jobs[...].task` (a key of a table of tables) -> ['jobs', '[...]', 'task']."""
    return re.findall(r"\[[^\]]*\]|[^.\[]+", path)


def _key(table: str, path: list[str]) -> str:
    parts = ([table] if table else []) + path
    *tables, key = parts if parts else [""]
    dotted_table = ".".join(tables).replace(".[...]", ".<name>").replace(".[", "[")
    return f"[{dotted_table}] {key}" if dotted_table else key


_ABSENT = object()


def _lookup(raw: Any, path: list[str]) -> Any:
    for part in path:
        if part.startswith("["):  # `[3]` in a list; `[...]` in a table of tables (msgspec does not say which key)
            index = part[1:-1]
            fits = isinstance(raw, list) and index.isdigit() and int(index) < len(raw)
            raw = raw[int(index)] if fits else _ABSENT
        else:
            raw = raw.get(part, _ABSENT) if isinstance(raw, dict) else _ABSENT
        if raw is _ABSENT:
            break
    return raw


def _type_at(type_: type, path: list[str]) -> Any:
    """The msgspec.inspect type found at `path` inside `type_`, or None."""
    info: Any = msgspec.inspect.type_info(type_)
    for part in path:
        info = _without_none(info)
        if part.startswith("["):
            if isinstance(info, msgspec.inspect.ListType):
                info = info.item_type
            else:
                info = info.value_type if isinstance(info, msgspec.inspect.DictType) else None
        elif isinstance(info, msgspec.inspect.StructType):
            info = {f.name: f.type for f in info.fields}.get(part)
        else:
            return None
    return _without_none(info)


def _without_none(info: Any) -> Any:
    if isinstance(info, msgspec.inspect.UnionType):
        others = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(others) == 1:
            return others[0]
    return info
