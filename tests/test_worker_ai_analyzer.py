"""The ai_analyzer: its rules, cache and chat client directly, then the worker under a real supervisor and broker.

The model is a local HTTP server that speaks chat completions (`FakeModel`); what it does with each request is
scripted per test: answer, answer late, fail with a status, send malformed JSON, or hang past the timeout.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import SupervisorFactory
from support import MqttProbe, free_port, wait_until

from workers._chat import ChatClient, Endpoint, ModelError, RateLimit, parse_answer
from workers.ai_analyzer import (
    BUILTIN_TASKS,
    AiAnalyzerConfig,
    Cache,
    Task,
    abbreviate_title,
    fallback_text,
    resolve_tasks,
)

TITLE = "FC Example vs. Sample United \N{EN DASH} Bundesliga, Matchday 12"
SHORT_TITLE = "FC Example \N{EN DASH} Sample Utd"


# A chat-completions server -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Behaviour:
    """What the fake model does with one request: `answer` ("AI <item>" per numbered item, after `delay`), `held`
    (answer once the model's `gate` opens), `text` (answer with `content`), `status` (fail with it), `malformed` (a
    body that is not JSON) or `hang`."""

    kind: str = "answer"
    status: int = 200
    retry_after: str | None = None
    delay: float = 0.0
    content: str = ""


class FakeModel:
    """A chat-completions endpoint on 127.0.0.1; each POST takes the next scripted `Behaviour` (default: answer)."""

    def __init__(self, port: int = 0) -> None:
        self.script: deque[Behaviour] = deque()
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.arrivals: list[float] = []
        self.active = 0
        self.most_active = 0
        self.released = threading.Event()  # set at the end of the test: hanging requests return
        self.gate = threading.Event()  # held requests are answered once it is set
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.released.set()
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        model = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with model.lock:
                    model.bodies.append(body)
                    model.authorizations.append(self.headers.get("Authorization"))
                    model.arrivals.append(time.monotonic())
                    behaviour = model.script.popleft() if model.script else Behaviour()
                    model.active += 1
                    model.most_active = max(model.most_active, model.active)
                try:
                    model.respond(self, body, behaviour)
                finally:
                    with model.lock:
                        model.active -= 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def respond(self, handler: BaseHTTPRequestHandler, body: dict[str, Any], behaviour: Behaviour) -> None:
        if self.path_of(handler) != "/v1/chat/completions":
            return self.send(handler, 404, b'{"error": "not found"}')
        if behaviour.kind == "hang":
            self.released.wait(30)
            return None
        if behaviour.kind == "malformed":
            return self.send(handler, 200, b'{"choices": [{"message": ')
        if behaviour.kind == "status":
            headers = {"Retry-After": behaviour.retry_after} if behaviour.retry_after is not None else {}
            return self.send(handler, behaviour.status, b'{"error": {"message": "scripted failure"}}', headers)
        self.released.wait(behaviour.delay)
        if behaviour.kind == "held":
            self.gate.wait(30)
        content = behaviour.content if behaviour.kind == "text" else answer_each_item(body)
        completion = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {
            "role": "assistant", "content": content}, "finish_reason": "stop"}]}  # fmt: skip
        return self.send(handler, 200, json.dumps(completion).encode())

    @staticmethod
    def path_of(handler: BaseHTTPRequestHandler) -> str:
        return handler.path

    @staticmethod
    def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        handler.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


def answer_each_item(body: dict[str, Any]) -> str:
    """A well-behaved model: one line "AI <item>" per numbered item of the user message."""
    user = body["messages"][-1]["content"]
    return "\n".join(f"AI {m.group(1)}" for m in re.finditer(r"^\d+\. (.*)$", user, re.MULTILINE))


@pytest.fixture
def model() -> Iterator[FakeModel]:
    server = FakeModel()
    yield server
    server.close()


def endpoint(model: FakeModel, **changes: Any) -> Endpoint:
    values: dict[str, Any] = {
        "base_url": model.base_url,
        "model": "test-model",
        "api_key": None,
        "temperature": 0.2,
        "max_tokens": None,
        "timeout_seconds": 1.0,
        "retries": 1,
        "retry_backoff_seconds": 0.01,
        "max_retry_wait_seconds": 5.0,
    }
    return Endpoint(**(values | changes))


# Rules, answers, cache, config: the pure parts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("title", "short"),
    [
        (TITLE, SHORT_TITLE),
        ("Bundesliga | Saint Example v Sample Athletic (away)", "St. Example \N{EN DASH} Sample Ath."),
        ("Jazz Night \N{EN DASH} Blue Cellar, Exampletown", "Jazz Night"),
        ("The Philharmonic Orchestra of Exampletown plays Beethoven", "The Phil. Orch. of Exampletown…"),
        ("  Open   Air  ", "Open Air"),
    ],
)
def test_titles_are_shortened_by_abbreviation_rules_without_the_model(title: str, short: str) -> None:
    assert abbreviate_title(title) == short
    assert len(short) <= 32


def test_suggestions_fall_back_to_a_template_sentence() -> None:
    phrase = BUILTIN_TASKS["phrase"]
    assert (
        fallback_text(phrase, "turn on light.kitchen at 07:00.")
        == "Suggested automation: turn on light.kitchen at 07:00."
    )
    assert fallback_text(Task(system="s", fallback_template="{item}"), " as  is. ") == "as is."


@pytest.mark.parametrize(
    "answer",
    [
        "one\ntwo",
        "1. one\n2) two\n",
        "- one\n\n* two",
        '"one"\n"two"',
        '["one", "two"]',
        '```json\n["one", "two"]\n```',
    ],
)
def test_model_answers_are_read_as_one_result_per_item(answer: str) -> None:
    assert parse_answer(answer, 2) == ["one", "two"]


def test_an_answer_with_the_wrong_number_of_lines_is_malformed() -> None:
    assert parse_answer("12 Monkeys", 1) == ["12 Monkeys"]  # a leading number is not numbering
    with pytest.raises(ModelError, match=r"^expected 2 line\(s\), one per item, got 3: 'Here you go:\\none\\ntwo'$"):
        parse_answer("Here you go:\none\ntwo", 2)
    with pytest.raises(ModelError, match=r"^expected 2 line\(s\), one per item, got 1: '\[\"one\"\]'$") as caught:
        parse_answer('["one"]', 2)
    assert caught.value.reason == "malformed"


def test_cache_keeps_answers_on_disk_and_evicts_the_least_recently_used(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache.sqlite3", max_entries=2)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"  # now b is the least recently used
    cache.put("c", "C")
    assert (len(cache), cache.get("b"), cache.get("a"), cache.get("c")) == (2, None, "A", "C")
    cache.close()
    reopened = Cache(tmp_path / "cache.sqlite3", max_entries=2)
    reopened.put("d", "D")  # the use order survived the restart: a was used before c
    assert (reopened.get("a"), reopened.get("c"), reopened.get("d")) == (None, "C", "D")
    assert reopened.clear() == 2
    assert len(reopened) == 0


def test_a_cache_file_that_is_not_a_database_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    path.write_bytes(b"not a database at all" * 100)
    cache = Cache(path, max_entries=10)
    cache.put("a", "A")
    assert cache.get("a") == "A"
    assert (tmp_path / "cache.corrupt").read_bytes().startswith(b"not a database")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM answers").fetchone() == (1,)


def test_config_is_strict_and_tasks_extend_or_override_the_built_ins() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"^Object contains unknown field `modle`$"):
        msgspec.convert({"modle": "x"}, AiAnalyzerConfig)
    with pytest.raises(msgspec.ValidationError, match=r"^tasks\.greet: a new task needs `system`"):
        msgspec.convert({"tasks": {"greet": {"user": "{items}"}}}, AiAnalyzerConfig)
    with pytest.raises(
        msgspec.ValidationError, match=r"^tasks\.shorten\.user: expected a template containing \{items\}"
    ):
        msgspec.convert({"tasks": {"shorten": {"user": "Shorten these"}}}, AiAnalyzerConfig)
    with pytest.raises(msgspec.ValidationError, match=r"^Expected `str` matching regex .* - at `\$\.base_url`$"):
        msgspec.convert({"base_url": "localhost:11434"}, AiAnalyzerConfig)
    config = msgspec.convert({"tasks": {"shorten": {"user": "Short names for:\n{items}"}}}, AiAnalyzerConfig)
    shorten = resolve_tasks(config.tasks)["shorten"]
    assert shorten.user == "Short names for:\n{items}"
    assert (shorten.system, shorten.fallback) == (BUILTIN_TASKS["shorten"].system, "abbreviate")


def test_rate_limit_allows_so_many_starts_per_minute() -> None:
    now = [100.0]
    limit = RateLimit(2, clock=lambda: now[0])
    assert (limit.reserve(), limit.reserve()) == (0.0, 0.0)
    now[0] = 130.0
    assert limit.reserve() == pytest.approx(30.0)  # the first start leaves the window at 160
    now[0] = 160.0
    assert limit.reserve() == 0.0
    assert RateLimit(0, clock=lambda: now[0]).reserve() == 0.0  # 0: no limit


# The chat client against the fake model ------------------------------------------------------------------------------


def test_client_posts_a_chat_completion_and_returns_the_answer(model: FakeModel) -> None:
    client = ChatClient(endpoint(model, api_key="sekrit", max_tokens=50), RateLimit(0))
    assert client.complete("Be brief.", "Shorten these 1 titles:\n1. Jazz Night") == "AI Jazz Night"
    assert model.bodies == [{
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Shorten these 1 titles:\n1. Jazz Night"},
        ],
        "temperature": 0.2,
        "stream": False,
        "max_tokens": 50,
    }]  # fmt: skip
    assert model.authorizations == ["Bearer sekrit"]
    ChatClient(endpoint(model), RateLimit(0)).complete("s", "1. x")
    assert model.authorizations[1] is None  # Ollama and llama.cpp need no key


def test_client_retries_a_429_after_its_retry_after(model: FakeModel) -> None:
    model.script.append(Behaviour("status", 429, retry_after="1"))
    client = ChatClient(endpoint(model, retry_backoff_seconds=0.01), RateLimit(0))
    assert client.complete("s", "1. x") == "AI x"
    assert len(model.arrivals) == 2
    assert model.arrivals[1] - model.arrivals[0] >= 0.95


def test_client_gives_up_on_5xx_after_its_retries(model: FakeModel) -> None:
    model.script.extend([Behaviour("status", 500), Behaviour("status", 503), Behaviour("status", 500)])
    client = ChatClient(endpoint(model, retries=2), RateLimit(0))
    with pytest.raises(
        ModelError, match=r"^POST http://127\.0\.0\.1:\d+/v1/chat/completions: HTTP 500: .*scripted"
    ) as e:
        client.complete("s", "1. x")
    assert (e.value.reason, e.value.status, len(model.bodies)) == ("http", 500, 3)


def test_client_does_not_retry_a_401_a_malformed_answer_or_a_timeout(model: FakeModel) -> None:
    client = ChatClient(endpoint(model, timeout_seconds=0.3, retries=3), RateLimit(0))
    model.script.append(Behaviour("status", 401))
    with pytest.raises(ModelError, match=r"^POST \S+: HTTP 401: "):
        client.complete("s", "1. x")
    model.script.append(Behaviour("malformed"))
    with pytest.raises(ModelError, match=r"^expected a chat completion, got b'\{\"choices\""):
        client.complete("s", "1. x")
    model.script.append(Behaviour("hang"))
    started = time.monotonic()
    with pytest.raises(ModelError, match=r"^POST \S+: no answer within 0\.3 s$") as e:
        client.complete("s", "1. x")
    assert e.value.reason == "timeout"
    assert time.monotonic() - started < 1.0
    assert len(model.bodies) == 3


def test_client_network_errors_are_retried_then_reported(model: FakeModel) -> None:
    closed = endpoint(model, base_url="http://127.0.0.1:1/v1", retries=1)
    with pytest.raises(ModelError, match=r"^POST http://127\.0\.0\.1:1/v1/chat/completions: .*[Cc]onnection refused"):
        ChatClient(closed, RateLimit(0)).complete("s", "1. x")


def test_stopping_the_client_ends_a_wait_between_attempts(model: FakeModel) -> None:
    model.script.append(Behaviour("status", 429, retry_after="30"))
    client = ChatClient(endpoint(model, max_retry_wait_seconds=30.0), RateLimit(0))
    failures: list[ModelError] = []

    def call() -> None:
        try:
            client.complete("s", "1. x")
        except ModelError as exc:
            failures.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: model.bodies, 5, "the first attempt")
    client.stop()
    thread.join(5)
    assert [f.reason for f in failures] == ["stopped"]


# The worker under a real supervisor ----------------------------------------------------------------------------------


def analyzer(model: FakeModel, **options: Any) -> dict[str, Any]:
    """A `[workers.ai_analyzer]` table pointing at the fake model, with short timeouts."""
    return {
        "base_url": model.base_url,
        "model": "test-model",
        "timeout_seconds": 3.0,
        "retries": 1,
        "retry_backoff_seconds": 0.05,
        "reply_deadline_seconds": 1.0,
        **options,
    }


def start(
    supervisors: SupervisorFactory, mqtt: MqttProbe, table: dict[str, Any], environment: dict[str, str] | None = None
) -> None:
    """Start a supervisor with the ai_analyzer; wait until it has subscribed (its birth) and the worker has started
    (its first sensor)."""
    mqtt.subscribe(f"{supervisors.prefix}/#")
    supervisors.start(
        {"ai_analyzer": table}, environment=environment, supervisor={"worker_packages": ["workers"]}
    )  # fmt: skip
    mqtt.wait_for(f"{supervisors.base}/availability", lambda m: m.text == "online")  # after every SUBACK
    mqtt.wait_for(f"{supervisors.base}/ai_analyzer/cache_entries", lambda m: m.text == "0")


def ask(mqtt: MqttProbe, base: str, reply_to: str, items: list[str], task: str = "shorten") -> str:
    """Publish an AiRequest; returns its id."""
    request_id = uuid.uuid4().hex[:8]
    request = {"id": request_id, "task": task, "items": items, "reply_to": reply_to}
    mqtt.publish(f"{base}/ai/request", json.dumps(request))
    return request_id


def reply(mqtt: MqttProbe, reply_to: str, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    found = mqtt.wait_for(reply_to, lambda m: m.json()["id"] == request_id, timeout=timeout)
    assert len(found) == 1, f"expected one reply to {request_id}, got {found}"
    answer: dict[str, Any] = found[0].json()
    return answer


def status(mqtt: MqttProbe, base: str, predicate: Any, what: str) -> dict[str, Any]:
    """The latest `<base>/status` document once one satisfies `predicate`."""
    found = mqtt.wait_for(f"{base}/status", lambda m: predicate(m.json()), timeout=10)
    document: dict[str, Any] = found[-1].json()
    assert predicate(document), what
    return document


def sensor(mqtt: MqttProbe, base: str, name: str, value: str, count: int = 1) -> None:
    """Wait for the `count`th publication of `value` on the sensor `name`."""
    mqtt.wait_for(f"{base}/ai_analyzer/{name}", lambda m: m.text == value, timeout=5, count=count)


def test_requests_get_correlated_replies_from_the_model_then_from_the_cache_until_it_is_cleared(
    supervisors: SupervisorFactory, mqtt: MqttProbe, model: FakeModel, prefix: str
) -> None:
    base, replies = supervisors.base, f"{prefix}/replies"
    start(supervisors, mqtt, analyzer(model))
    first = ask(mqtt, base, replies, [TITLE, "Jazz Night"])
    assert reply(mqtt, replies, first) == {
        "id": first,
        "task": "shorten",
        "results": [f"AI {TITLE}", "AI Jazz Night"],
        "fallback": False,
        "cached": False,
        "model": "test-model",
        "error": None,
    }
    assert model.bodies[0]["model"] == "test-model"
    assert model.bodies[0]["messages"][1]["content"] == f"Shorten these 2 titles:\n1. {TITLE}\n2. Jazz Night"
    sensor(mqtt, base, "cache_entries", "2")
    sensor(mqtt, base, "cache_misses", "2")
    mqtt.wait_for(f"{base}/ai_analyzer/latency_ms", lambda m: m.text.isdigit())

    second = ask(mqtt, base, replies, [TITLE, "Jazz Night"])
    cached = reply(mqtt, replies, second)
    assert (cached["results"], cached["cached"], cached["fallback"]) == ([f"AI {TITLE}", "AI Jazz Night"], True, False)
    sensor(mqtt, base, "cache_hits", "2")
    assert len(model.bodies) == 1, "the second request was answered from the cache"

    mqtt.publish(f"{base}/cmd/ai_analyzer/clear_cache", "PRESS")
    sensor(mqtt, base, "cache_entries", "0", count=2)  # the first was at start
    third = ask(mqtt, base, replies, [TITLE])
    assert reply(mqtt, replies, third)["cached"] is False
    assert len(model.bodies) == 2
    document = status(mqtt, base, lambda d: d["workers"]["ai_analyzer"].get("ai_model") == "test-model", "ai_model")
    assert document["ai_enabled"] is True
    assert document["workers"]["ai_analyzer"]["errors"] == {}


def test_a_429_is_retried_after_retry_after_and_the_reply_comes_from_the_model(
    supervisors: SupervisorFactory, mqtt: MqttProbe, model: FakeModel, prefix: str
) -> None:
    base, replies = supervisors.base, f"{prefix}/replies"
    model.script.append(Behaviour("status", 429, retry_after="1"))
    start(supervisors, mqtt, analyzer(model, api_key_env="AI_TEST_KEY", reply_deadline_seconds=5.0),
          environment={"AI_TEST_KEY": "sekrit"})  # fmt: skip
    request_id = ask(mqtt, base, replies, ["Jazz Night"])
    answer = reply(mqtt, replies, request_id)
    assert (answer["results"], answer["fallback"], answer["error"]) == (["AI Jazz Night"], False, None)
    assert model.arrivals[1] - model.arrivals[0] >= 0.95
    assert model.authorizations == ["Bearer sekrit", "Bearer sekrit"]


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        (Behaviour("status", 500), r"^http: POST http://127\.0\.0\.1:\d+/v1/chat/completions: HTTP 500: "),
        (Behaviour("malformed"), r"^malformed: expected a chat completion, got b'"),
        (Behaviour("text", content="only one line"), r"^malformed: expected 2 line\(s\), one per item, got 1: "),
        (Behaviour("hang"), r"^no answer from the model within 1\.0 s$"),
    ],
    ids=["server_error", "malformed_json", "wrong_line_count", "hang"],
)
def test_a_failing_model_yields_rule_based_replies_within_the_deadline_and_counted_ai_errors(
    supervisors: SupervisorFactory, mqtt: MqttProbe, model: FakeModel, prefix: str, behaviour: Behaviour, error: str
) -> None:
    base, replies = supervisors.base, f"{prefix}/replies"
    model.script.extend([behaviour, behaviour])  # one retry, for the kinds that are retried
    start(supervisors, mqtt, analyzer(model))
    sent = time.monotonic()
    request_id = ask(mqtt, base, replies, [TITLE, "Jazz Night"])
    answer = reply(mqtt, replies, request_id, timeout=5.0)
    # Well before the model's timeout (3 s, so a hung model is never waited for), with room for a busy machine.
    assert time.monotonic() - sent < 2.5, "the reply came later than the deadline (1 s) allows"
    assert re.match(error, answer.pop("error")), answer
    assert answer == {
        "id": request_id,
        "task": "shorten",
        "results": [SHORT_TITLE, "Jazz Night"],
        "fallback": True,
        "cached": False,
        "model": None,
    }
    document = status(mqtt, base, lambda d: d["ai_error_count"] >= 1, "an ai error in the status")
    assert document["workers"]["ai_analyzer"]["errors"] == {"ai": 1}
    assert document["ai_enabled"] is True


def test_with_the_model_disabled_requests_get_rules_at_once_and_only_bad_requests_count_errors(
    supervisors: SupervisorFactory, mqtt: MqttProbe, model: FakeModel, prefix: str
) -> None:
    base, replies = supervisors.base, f"{prefix}/replies"
    greet = {"system": "Greet each person.", "fallback_template": "Hello, {item}!"}
    start(supervisors, mqtt, analyzer(model, ai_enabled=False, tasks={"greet": greet}))
    local = ask(mqtt, base, f"{base}/ai/reply/local", ["Jazz Night"])  # a reply under <base>/ stays local
    greeting = reply(mqtt, replies, ask(mqtt, base, replies, ["Ada", "Linus"], task="greet"))
    assert (greeting["results"], greeting["fallback"]) == (["Hello, Ada!", "Hello, Linus!"], True)
    assert greeting["error"] == "the model is disabled (ai_enabled = false)"
    unknown = reply(mqtt, replies, ask(mqtt, base, replies, ["x"], task="summarise"))
    assert (unknown["results"], unknown["fallback"]) == (["x"], True)
    assert unknown["error"] == "unknown task 'summarise'; expected one of: greet, phrase, shorten"
    document = status(mqtt, base, lambda d: d["workers"]["ai_analyzer"]["handled"] >= 3, "three requests handled")
    assert document["workers"]["ai_analyzer"]["errors"] == {"decode": 1}
    assert (document["ai_enabled"], document["ai_error_count"]) == (False, 0)
    assert model.bodies == []
    assert mqtt.received(f"{base}/ai/reply/local") == [], f"the reply to {local} left the supervisor"


def test_at_most_max_concurrent_requests_reach_the_model_at_once(
    supervisors: SupervisorFactory, mqtt: MqttProbe, model: FakeModel, prefix: str
) -> None:
    base, replies = supervisors.base, f"{prefix}/replies"
    model.script.extend([Behaviour("held")] * 4)
    start(supervisors, mqtt, analyzer(model, max_concurrent_requests=2, reply_deadline_seconds=20.0))
    requests = [ask(mqtt, base, replies, [f"Event {n}"]) for n in range(4)]
    wait_until(lambda: model.active == 2, 10, "two requests at the model at once")
    model.gate.set()
    answers = [reply(mqtt, replies, request_id) for request_id in requests]
    assert [a["results"] for a in answers] == [[f"AI Event {n}"] for n in range(4)]
    assert model.most_active == 2


def test_a_request_waiting_on_the_model_is_answered_by_rules_when_the_supervisor_stops(
    supervisors: SupervisorFactory, mqtt: MqttProbe, model: FakeModel, prefix: str
) -> None:
    base, replies = supervisors.base, f"{prefix}/replies"
    model.script.append(Behaviour("hang"))
    start(supervisors, mqtt, analyzer(model, reply_deadline_seconds=30.0, timeout_seconds=1.5))
    request_id = ask(mqtt, base, replies, ["Jazz Night"])
    wait_until(lambda: model.bodies, 5, "the request to reach the model")
    supervisors.started[0].signal(signal.SIGTERM)
    answer = reply(mqtt, replies, request_id, timeout=5.0)
    assert (answer["results"], answer["fallback"]) == (["Jazz Night"], True)
    assert answer["error"] == "the ai_analyzer stopped before the model answered"
    assert supervisors.started[0].wait() == 0
    assert "worker ai_analyzer stopped: exit code 0" in supervisors.started[0].log()


def test_a_model_not_there_at_start_is_said_once_and_rules_answer_at_once_until_it_comes(
    supervisors: SupervisorFactory, mqtt: MqttProbe, prefix: str
) -> None:
    base, replies, port = supervisors.base, f"{prefix}/replies", free_port()
    table = {"base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "retries": 2, "probe_interval_seconds": 0.3}
    start(supervisors, mqtt, table)
    process = supervisors.started[-1]
    process.wait_log("is not reachable (")
    sent = time.monotonic()
    answer = reply(mqtt, replies, ask(mqtt, base, replies, [TITLE]))
    assert time.monotonic() - sent < 1.0  # no retries, no waiting for a server that is not there
    assert (answer["fallback"], answer["results"]) == (True, [SHORT_TITLE])
    assert answer["error"].startswith("the model is not reachable (")
    assert "error (ai)" not in process.log() and process.log().count("is not reachable (") == 1
    model = FakeModel(port)
    try:
        process.wait_log("is reachable again")
        answer = reply(mqtt, replies, ask(mqtt, base, replies, ["Jazz Night"]))
        assert (answer["fallback"], answer["results"]) == (False, ["AI Jazz Night"])
    finally:
        model.close()
