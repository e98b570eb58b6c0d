"""Config loading: defaults, overrides, secrets, worker sections, and one-line errors that name file and key."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from supervisor import config
from supervisor.errors import ConfigError
from supervisor.registry import discover

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> config.Settings:
    """Load `text` with the test workers discoverable."""
    packages = 'worker_packages = ["testworkers"]\n'
    if "[supervisor]\n" in text:
        text = text.replace("[supervisor]\n", "[supervisor]\n" + packages, 1)
    else:
        text = "[supervisor]\n" + packages + text
    return config.load(write(tmp_path, text), environ or {})


def test_shipped_config_is_valid_and_has_every_table() -> None:
    settings = config.load(ROOT / "deploy" / "config.toml", {})
    assert settings.mqtt.port == 1883
    assert settings.mqtt.availability_topic == "supervisor/availability"
    assert settings.metrics.bind == "127.0.0.1"


def test_shipped_config_names_every_option() -> None:
    text = (ROOT / "deploy" / "config.toml").read_text()
    tables = [
        config.SupervisorConfig,
        config.MqttConfig,
        config.TlsConfig,
        config.MetricsConfig,
        config.HomeAssistantConfig,
        config.WorkerSupervision,
    ]
    missing = [
        f
        for t in tables
        for f in t.__struct_fields__
        if not re.search(rf"^#? ?{f} =", text, re.M) and f"[mqtt.{f}]" not in text
    ]
    assert missing == []


def test_shipped_config_names_every_option_of_every_shipped_worker() -> None:
    text = (ROOT / "deploy" / "config.toml").read_text()
    missing = []
    for name, worker in discover(["workers"]).items():
        assert f"[workers.{name}]" in text
        for struct in _structs(msgspec.inspect.type_info(worker.Config)):
            for field in struct.fields:
                named = re.search(rf"^#? ?{field.name} =|\b{field.name} = |\.{field.name}[\].]", text, re.M)
                if named is None:
                    missing.append(f"{name}: {struct.cls.__name__}.{field.name}")
    assert missing == []


def _structs(info: Any) -> list[Any]:
    """Every Struct type reachable from `info` (fields, list items, dict values, unions)."""
    if isinstance(info, msgspec.inspect.StructType):
        return [info] + [s for f in info.fields for s in _structs(f.type)]
    if isinstance(info, msgspec.inspect.ListType):
        return _structs(info.item_type)
    if isinstance(info, msgspec.inspect.DictType):
        return _structs(info.value_type)
    if isinstance(info, msgspec.inspect.UnionType):
        return [s for t in info.types for s in _structs(t)]
    return []


def test_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, ""), {})
    assert settings.supervisor.base_topic == "supervisor"
    assert settings.mqtt.protocol == 5
    assert settings.mqtt.message_expiry_seconds == 300
    assert settings.mqtt.birth_payload == "online" and settings.mqtt.will_payload == "offline"
    assert settings.mqtt.client_id.startswith("supervisor-")
    assert settings.homeassistant.discovery_prefix == "homeassistant"
    assert settings.homeassistant.status_topic == "homeassistant/status"
    assert settings.state_dir == Path("state").absolute()
    assert settings.workers == ()


def test_availability_topic_follows_the_base_topic(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, '[supervisor]\nbase_topic = "home/sup"\n'), {})
    assert settings.mqtt.availability_topic == "home/sup/availability"


def test_state_dir_comes_from_systemd_when_not_configured(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, ""), {"STATE_DIRECTORY": "/var/lib/sup"})
    assert settings.state_dir == Path("/var/lib/sup")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("[supervisor]", r"\[supervisor\] colour: unknown key; expected one of: base_topic, "),
        ("[mqtt]", r"\[mqtt\] colour: unknown key; expected one of: availability_topic, "),
        ("[mqtt.tls]", r"\[mqtt.tls\] colour: unknown key; expected one of: ca_file, cert_file, enabled, "),
        ("[metrics]", r"\[metrics\] colour: unknown key; expected one of: bind, port$"),
        ("[homeassistant]", r"\[homeassistant\] colour: unknown key; expected one of: discovery_prefix, "),
        (
            "[workers.echo]\ntopics = []\nout = 'x'",
            r"\[workers.echo\] colour: unknown key; expected one of: .*max_restarts.*topics",
        ),
    ],
)
def test_unknown_key_in_any_table_is_named(tmp_path: Path, table: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}/config.toml: {expected}"):
        load(tmp_path, f"{table}\ncolour = 'blue'\n")


def test_unknown_top_level_table_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"config.toml: colour: unknown key; expected one of: homeassistant, "
        r"metrics, mqtt, supervisor, workers$",
    ):
        load(tmp_path, "[colour]\nx = 1\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[mqtt]\nport = "often"', r'\[mqtt\] port: expected int, got "often"$'),
        ("[mqtt]\nport = 70000", r"\[mqtt\] port: expected int <= 65535, got 70000$"),
        ("[mqtt]\nprotocol = 4", r"\[mqtt\] protocol: expected one of 5, 311, got 4$"),
        (
            "[mqtt]\nmessage_expiry_seconds = 30",
            r"\[mqtt\] message_expiry_seconds: expected int >= 60, got 30$",
        ),
        (
            "[mqtt]\nmessage_expiry_seconds = 7200",
            r"\[mqtt\] message_expiry_seconds: expected int <= 3600, got 7200$",
        ),
        ("[mqtt.tls]\nenabled = 1", r"\[mqtt.tls\] enabled: expected bool, got 1$"),
        ("[metrics]\nport = -1", r"\[metrics\] port: expected int >= 0, got -1$"),
        (
            "[supervisor]\nshutdown_timeout_seconds = 0",
            r"\[supervisor\] shutdown_timeout_seconds: expected float > 0.0, got 0$",
        ),
        (
            "[mqtt]\nreconnect_min_seconds = 2.0",
            r"\[mqtt\] reconnect_max_seconds: expected >= reconnect_min_seconds \(2\), got 0.5$",
        ),
        ('[workers.echo]\ntopics = "a/b"\nout = "x"', r'\[workers.echo\] topics: expected array, got "a/b"$'),
        ('[workers.echo]\ntopics = ["a"]', r"\[workers.echo\] out: missing required key$"),
        (
            '[workers.echo]\ntopics = ["a"]\nout = "x"\nrestart = "sometimes"',
            r'\[workers.echo\] restart: expected one of "permanent", "temporary", "transient", got "sometimes"$',
        ),
        (
            '[workers.echo]\ntopics = ["a"]\nout = "x"\nmax_restarts = -1',
            r"\[workers.echo\] max_restarts: expected int >= 0, got -1$",
        ),
    ],
)
def test_wrong_value_names_the_key_what_was_expected_and_what_was_found(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}/config.toml: {expected}"):
        load(tmp_path, text + "\n")


def test_unknown_worker_lists_the_workers_found(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"config.toml: \[workers.scrapper\]: no worker named 'scrapper'; "
        r"workers found: broken_start, declarer, echo, relay, tally, ticker, typed$",
    ):
        load(tmp_path, "[workers.scrapper]\n")


def test_a_worker_can_run_twice_under_two_names(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        '[workers.left]\nworker = "echo"\ntopics = ["a"]\nout = "l"\n'
        '[workers.right]\nworker = "echo"\ntopics = ["b"]\nout = "r"\n',
    )
    assert [(w.name, w.worker_class.name) for w in settings.workers] == [("left", "echo"), ("right", "echo")]
    assert [w.config.out for w in settings.workers] == ["l", "r"]  # type: ignore[attr-defined]


def test_disabled_worker_is_validated_but_not_run(tmp_path: Path) -> None:
    settings = load(tmp_path, '[workers.echo]\nenabled = false\ntopics = ["a"]\nout = "x"\n')
    assert settings.workers == ()
    with pytest.raises(ConfigError, match=r"\[workers.echo\] out: missing required key$"):
        load(tmp_path, '[workers.echo]\nenabled = false\ntopics = ["a"]\n')


def test_supervision_keys_are_split_from_the_worker_config(tmp_path: Path) -> None:
    settings = load(tmp_path, '[workers.echo]\ntopics = ["a"]\nout = "x"\nrestart = "transient"\nmax_restarts = 2\n')
    (echo,) = settings.workers
    assert echo.supervision.restart == "transient" and echo.supervision.max_restarts == 2
    assert echo.config.topics == ["a"]  # type: ignore[attr-defined]


def test_environment_overrides_the_broker_address_and_credentials(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        '[mqtt]\nhost = "file-host"\nport = 1\nusername = "file-user"\n',
        {
            "MQTT_BROKER_HOST": "env-host",
            "MQTT_BROKER_PORT": "8883",
            "MQTT_USERNAME": "env-user",
            "MQTT_PASSWORD": "env-secret",
        },
    )
    assert (settings.mqtt.host, settings.mqtt.port, settings.mqtt.username) == ("env-host", 8883, "env-user")
    assert settings.password is not None and settings.password.reveal() == "env-secret"


def test_bad_port_in_the_environment_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^environment: MQTT_BROKER_PORT: expected a port 1..65535, got 'x'$"):
        load(tmp_path, "", {"MQTT_BROKER_PORT": "x"})


def test_password_from_an_environment_variable_never_shows_in_repr(tmp_path: Path) -> None:
    settings = load(tmp_path, '[mqtt]\nusername = "u"\npassword_env = "SUP_PW"\n', {"SUP_PW": "hunter2"})
    assert settings.password is not None and settings.password.reveal() == "hunter2"
    assert "hunter2" not in repr(settings)


def test_password_from_a_file_drops_the_trailing_newline(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    settings = load(tmp_path, f'[mqtt]\npassword_file = "{secret}"\n')
    assert settings.password is not None and settings.password.reveal() == "s3cret"


def test_missing_password_sources_are_clear(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"config.toml: \[mqtt\] password_env: the environment variable NOPE is not set$"
    ):
        load(tmp_path, '[mqtt]\npassword_env = "NOPE"\n')
    with pytest.raises(ConfigError, match=r"config.toml: \[mqtt\] password_file: cannot read /no/such: No such file"):
        load(tmp_path, '[mqtt]\npassword_file = "/no/such"\n')


def test_missing_file_and_broken_toml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"/absent.toml: no such file; pass an existing file with --config$"):
        config.load(tmp_path / "absent.toml", {})
    with pytest.raises(ConfigError, match=r"config.toml: invalid TOML: .*line 1"):
        config.load(write(tmp_path, "[mqtt\n"), {})


def test_an_error_inside_a_table_of_tables_is_reported_not_raised(tmp_path: Path) -> None:
    text = '[supervisor]\nworker_packages = ["workers"]\n[workers.batch_scheduler.jobs.nightly]\ntask = "nap"\n'
    expected = r'config.toml: \[workers.batch_scheduler.jobs.<name>\] task: expected one of "analysis", "retention"$'
    with pytest.raises(ConfigError, match=expected):
        config.load(write(tmp_path, text), {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[supervisor]\nbase_topic = ""',
            r"\[supervisor\] base_topic: expected an MQTT topic without wildcards, but the topic is empty$",
        ),
        (
            '[supervisor]\nbase_topic = "home/#"',
            r"\[supervisor\] base_topic: expected an MQTT topic without wildcards, "
            r"but the topic 'home/#' contains a wildcard \(\+ or #\)$",
        ),
        ('[supervisor]\nbase_topic = "a/+/b"', r"\[supervisor\] base_topic: .* contains a wildcard"),
        ('[supervisor]\nbase_topic = "$SYS/x"', r"\[supervisor\] base_topic: expected a topic not starting with '\$'"),
        ('[supervisor]\nbase_topic = "a\\u0000b"', r"\[supervisor\] base_topic: .* contains a NUL character$"),
        ('[mqtt]\navailability_topic = "x/#"', r"\[mqtt\] availability_topic: .* contains a wildcard"),
        ('[homeassistant]\nstatus_topic = "+/status"', r"\[homeassistant\] status_topic: .* contains a wildcard"),
        ('[homeassistant]\ndiscovery_prefix = ""', r"\[homeassistant\] discovery_prefix: .* the topic is empty$"),
        ('[mqtt]\nhost = ""', r"\[mqtt\] host: expected a host name or address, got ''$"),
        ('[mqtt]\nhost = "a b"', r"\[mqtt\] host: expected a host name or address, got 'a b'$"),
        (
            '[metrics]\nbind = "everywhere"',
            r"\[metrics\] bind: expected an IP address such as 127.0.0.1, 0.0.0.0 or ::, got 'everywhere'$",
        ),
        ("[mqtt]\nreconnect_min_seconds = nan", r"\[mqtt\] reconnect_min_seconds: expected a finite number, got nan$"),
        (
            "[supervisor]\nshutdown_timeout_seconds = inf",
            r"\[supervisor\] shutdown_timeout_seconds: expected a finite number, got inf$",
        ),
        (
            "[supervisor]\nshutdown_timeout_seconds = 1e30",
            r"\[supervisor\] shutdown_timeout_seconds: expected float <= 31536000",
        ),
        (
            "[mqtt]\nsession_expiry_seconds = 99999999999",
            r"\[mqtt\] session_expiry_seconds: expected int <= 4294967295",
        ),
        (
            '[mqtt.tls]\nenabled = true\nca_file = "/nonexistent/ca.pem"',
            r"\[mqtt.tls\] ca_file: expected a readable file, got '/nonexistent/ca.pem'$",
        ),
        (
            '[workers."a/b"]\ntopics = ["x"]\nout = "y"\nworker = "echo"',
            r"\[workers.a/b\]: expected a worker name of ASCII letters, digits, '_' and '-'",
        ),
        ('[workers."a#"]\ntopics = ["x"]\nout = "y"\nworker = "echo"', r"\[workers.a#\]: expected a worker name"),
        ('[workers."café"]\ntopics = ["x"]\nout = "y"\nworker = "echo"', r"\[workers.café\]: expected a worker name"),
        (
            '[workers.echo]\ntopics = ["x"]\nout = "y"\nbackoff_min_seconds = 5.0\nbackoff_max_seconds = 1.0',
            r"\[workers.echo\] backoff_max_seconds: expected >= backoff_min_seconds \(5\), got 1$",
        ),
    ],
)
def test_nonsense_values_are_refused_by_check_config_with_one_line_naming_the_key(
    tmp_path: Path, text: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from supervisor import cli

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}/config.toml: {expected}"):
        load(tmp_path, text + "\n")
    path = tmp_path / "config.toml"  # as `load` left it, with the test workers' package
    assert cli.main(["--config", str(path), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(rf"^error: {re.escape(str(path))}: {expected}", err), err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[mqtt]\nport = 1883\n".encode("utf-16"), r"expected UTF-8 text, got byte 0xff at offset 0$"),
        (bytes(range(256)), r"expected UTF-8 text, got byte 0x80 at offset 128$"),
    ],
)
def test_a_config_file_that_is_not_utf8_text_is_refused_with_one_line(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {expected}"):
        config.load(path, {})


def test_a_fifo_given_as_the_config_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r": expected a regular TOML file, got a pipe, socket or device$"):
        config.load(fifo, {})


_HOSTILE_VALUES = [
    '""',
    '"#"',
    '"a/+/b"',
    '"\\u0000"',
    '"é/ü"',
    f'"{"x" * 5000}"',
    "-1",
    "0",
    "1e300",
    "nan",
    "-inf",
    str(2**70),
    "true",
    "[]",
    "{}",
    '["#"]',
]


def test_every_mutation_of_the_shipped_config_is_accepted_or_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from supervisor import cli

    lines = (ROOT / "deploy" / "config.toml").read_text().splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^#? ?[a-z_]+ = ", line)]
    path = tmp_path / "config.toml"
    outcomes: dict[int, int] = {}
    for index in keys:
        key = lines[index].lstrip("# ").split(" = ")[0]
        for value in _HOSTILE_VALUES:
            mutated = [*lines]
            mutated[index] = f"{key} = {value}"
            path.write_text("\n".join(mutated) + "\n")
            code = cli.main(["--config", str(path), "--check-config"])
            err = capsys.readouterr().err
            assert code in (0, 2), (key, value, code, err)
            if code == 2:
                assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (key, value, err)
            outcomes[code] = outcomes.get(code, 0) + 1
    assert outcomes[2] > outcomes.get(0, 0) > 0  # most are nonsense; some are fine (a key set to its own kind)
