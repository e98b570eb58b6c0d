"""Several supervisors ("hosts": own client ids, base topics, state directories) on one Mosquitto share a worker's
input through MQTT 5 shared subscriptions (`share_group`): each message to one of them, nothing lost when one is
killed and started again, and a worker that does not share still gets every message on every host."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SupervisorFactory, SupervisorProcess, supervisors_on
from support import Broker, MqttProbe, wait_until

from supervisor import config
from supervisor.errors import ConfigError

HOSTS = 3
MESSAGES = 3000


@contextlib.contextmanager
def hosts(
    broker: Broker, tmp_path: Path, prefix: str, request: pytest.FixtureRequest
) -> Iterator[list[SupervisorFactory]]:
    """A supervisor factory per host: its own directory, base topic and client id."""
    with contextlib.ExitStack() as stack:
        factories = []
        for i in range(HOSTS):
            workdir = tmp_path / f"host{i}"
            workdir.mkdir()
            factories.append(stack.enter_context(supervisors_on(broker, workdir, f"{prefix}/h{i}", request)))
        yield factories


def every_message_on_each_host(mqtt: MqttProbe, prefix: str, payloads: list[str]) -> None:
    for host in range(HOSTS):

        def complete(h: int = host) -> bool:
            return set(handled(mqtt, prefix, "every", h)) == set(payloads)

        wait_until(complete, 60, f"every message on h{host}")


def status_with(mqtt: MqttProbe, base: str, shared_handled: int) -> dict[str, Any]:
    """The host's latest status in which its shared worker has handled `shared_handled` messages."""

    def found() -> dict[str, Any] | None:
        for m in reversed(mqtt.received(f"{base}/status")):
            if m.json()["workers"]["shared"]["handled"] == shared_handled:
                return m.json()  # type: ignore[no-any-return]
        return None

    return wait_until(found, 20, f"the status of {base} with its share")  # type: ignore[no-any-return]


def workers(prefix: str, host: int) -> dict[str, dict[str, Any]]:
    """On each host: the echo worker sharing `<prefix>/in/#` with the others, and one taking every message."""
    return {
        "shared": {
            "worker": "echo",
            "topics": [f"{prefix}/in/#"],
            "out": f"{prefix}/out/h{host}",
            "qos": 1,
            "share_group": "echoes",
        },
        "every": {"worker": "echo", "topics": [f"{prefix}/in/#"], "out": f"{prefix}/every/h{host}", "qos": 1},
    }


def start_host(factory: SupervisorFactory, mqtt: MqttProbe, prefix: str, host: int) -> SupervisorProcess:
    mqtt.subscribe(f"{factory.base}/#")
    seen = len(mqtt.received(f"{prefix}/out/h{host}/started"))
    process = factory.start(workers(prefix, host))
    mqtt.wait_for(f"{prefix}/out/h{host}/started", count=seen + 1)
    mqtt.wait_for(f"{prefix}/every/h{host}/started", count=seen + 1)
    mqtt.wait_for(f"{factory.base}/availability", lambda m: m.text == "online", count=seen + 1)
    return process


def handled(mqtt: MqttProbe, prefix: str, kind: str, host: int) -> list[str]:
    """The payloads host `host`'s worker `kind` ("out": the shared one, "every") echoed."""
    return [m.json()["payload"] for m in mqtt.received(f"{prefix}/{kind}/h{host}/echo")]


def test_three_hosts_split_a_shared_workers_input_and_each_gets_every_message_of_a_worker_that_does_not_share(
    broker: Broker, mqtt: MqttProbe, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    mqtt.subscribe(f"{prefix}/out/#", f"{prefix}/every/#")
    with hosts(broker, tmp_path, prefix, request) as factories:
        for host, factory in enumerate(factories):
            start_host(factory, mqtt, prefix, host)
        payloads = [f"m{i}" for i in range(MESSAGES)]
        for payload in payloads:
            mqtt.publish(f"{prefix}/in/x", payload, qos=1)
        wait_until(
            lambda: sum(len(handled(mqtt, prefix, "out", h)) for h in range(HOSTS)) >= MESSAGES,
            60,
            "every shared message",
        )
        shares = [handled(mqtt, prefix, "out", h) for h in range(HOSTS)]
        assert sorted(p for share in shares for p in share) == sorted(payloads)  # each exactly once
        assert all(len(share) > MESSAGES // (4 * HOSTS) for share in shares), [len(s) for s in shares]
        every_message_on_each_host(mqtt, prefix, payloads)
        # Each host shows its own share in its own status.
        for factory, share in zip(factories, shares, strict=True):
            assert status_with(mqtt, factory.base, len(share))["workers"]["every"]["handled"] == MESSAGES


def test_a_host_killed_mid_stream_and_started_again_loses_nothing(
    broker: Broker, mqtt: MqttProbe, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    mqtt.subscribe(f"{prefix}/out/#", f"{prefix}/every/#")
    with hosts(broker, tmp_path, prefix, request) as factories:
        processes = [start_host(factory, mqtt, prefix, host) for host, factory in enumerate(factories)]
        payloads = [f"m{i}" for i in range(MESSAGES)]
        for payload in payloads[: MESSAGES // 3]:
            mqtt.publish(f"{prefix}/in/x", payload, qos=1)
        victim = processes[1]
        os.kill(victim.pid, signal.SIGKILL)  # its workers follow it (they die with their parent)
        victim.process.wait(10)
        for payload in payloads[MESSAGES // 3 : 2 * MESSAGES // 3]:
            mqtt.publish(f"{prefix}/in/x", payload, qos=1)
        start_host(factories[1], mqtt, prefix, 1)  # same client id and state: its session and outbox resume
        for payload in payloads[2 * MESSAGES // 3 :]:
            mqtt.publish(f"{prefix}/in/x", payload, qos=1)

        def shared_seen() -> set[str]:
            return {p for h in range(HOSTS) for p in handled(mqtt, prefix, "out", h)}

        wait_until(lambda: shared_seen() == set(payloads), 60, "every shared message handled at least once")
        every_message_on_each_host(mqtt, prefix, payloads)


def test_share_group_needs_mqtt_5_and_a_plain_name(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    section = '[workers.echo]\ntopics = ["in/#"]\nout = "out"\nshare_group = true\n'
    path.write_text('[supervisor]\nworker_packages = ["testworkers"]\n[mqtt]\nprotocol = 311\n' + section)
    with pytest.raises(ConfigError, match=r"\[workers\.echo\] share_group: shared subscriptions need MQTT 5"):
        config.load(path, {})
    path.write_text('[supervisor]\nworker_packages = ["testworkers"]\n' + section.replace("true", '"a/b"'))
    with pytest.raises(ConfigError, match=r"\[workers\.echo\] share_group: expected a name without /"):
        config.load(path, {})
    path.write_text('[supervisor]\nworker_packages = ["testworkers"]\n' + section)
    with pytest.raises(ConfigError, match=r"\[supervisor\] base_topic: with share_group \(\[workers\.echo\]\) several"):
        config.load(path, {})  # every host would publish its status on supervisor/status
    path.write_text('[supervisor]\nworker_packages = ["testworkers"]\nbase_topic = "home/{host}"\n' + section)
    settings = config.load(path, {})
    (worker,) = settings.workers
    assert worker.share_group == "echo"
    assert settings.supervisor.base_topic == f"home/{config.host_slug()}"
    assert settings.mqtt.availability_topic == f"home/{config.host_slug()}/availability"


def test_a_publication_of_a_local_worker_on_a_shared_topic_is_handled_once_in_the_group(
    broker: Broker, mqtt: MqttProbe, prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """No Local is not allowed on a shared subscription: the supervisor does not hand a local publication to its own
    shared worker, the broker gives it to one member of the group (maybe this one); the worker that does not share
    gets it locally on this host and from the broker on the others."""
    mqtt.subscribe(f"{prefix}/out/#", f"{prefix}/every/#", f"{prefix}/fwd-out/#")
    with hosts(broker, tmp_path, prefix, request) as factories:
        for host, factory in enumerate(factories):
            start_host(factory, mqtt, prefix, host)
        forwarder = {"worker": "echo", "topics": [f"{prefix}/fwd"], "out": f"{prefix}/fwd-out", "qos": 1}
        # Host 0 again with a forwarder: a third supervisor process would be another client; restart host 0 instead.
        factories[0].started[0].signal(signal.SIGTERM)
        assert factories[0].started[0].wait() == 0
        process = factories[0].start({**workers(prefix, 0), "forwarder": forwarder})
        mqtt.wait_for(f"{prefix}/fwd-out/started")
        process.wait_log("subscribed to")
        for i in range(30):
            mqtt.publish(f"{prefix}/fwd", f"forward:{prefix}/in/f{i}", qos=1)
        wait_until(lambda: sum(len(handled(mqtt, prefix, "out", h)) for h in range(HOSTS)) >= 30, 30, "the group")
        wait_until(
            lambda: all(len(handled(mqtt, prefix, "every", h)) >= 30 for h in range(HOSTS)), 30, "every host's copy"
        )
        mqtt.publish(f"{prefix}/in/last", "last", qos=1)  # after everything above, on every host
        every_message_on_each_host(mqtt, prefix, ["from forwarder", "last"])
        wait_until(lambda: any("last" in handled(mqtt, prefix, "out", h) for h in range(HOSTS)), 30, "the last")
        shares = [handled(mqtt, prefix, "out", h) for h in range(HOSTS)]
        assert sum(s.count("from forwarder") for s in shares) == 30  # each forwarded message once in the group
        every_host = [handled(mqtt, prefix, "every", h) for h in range(HOSTS)]
        assert [e.count("from forwarder") for e in every_host] == [30, 30, 30]
