"""The ai_analyzer's client for an OpenAI-compatible chat-completions API (OpenAI, Ollama, llama.cpp, LocalAI).

It asks for one short text per item: the items go out numbered, one per line, and the answer must come back as one
line (or one JSON array element) per item.

Blocking, standard library only (urllib), meant to run on a background thread (`ctx.run_in_thread`). One call is
one POST to `{base_url}/chat/completions`, retried on 429 (honouring Retry-After), on 5xx and on network errors,
with at most `requests_per_minute` attempts in any minute across every thread that shares the client.

Failure policy: every way a call can fail (HTTP status, network, timeout, an answer that is not a chat
completion, the client stopping) is raised as one `ModelError` whose `reason` says which; nothing else escapes.
A timeout is not retried: a model too slow once is too slow again, and the caller has its own deadline.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from contracts.decoding import BoundedJson

Reason = Literal["http", "network", "timeout", "malformed", "stopped"]
_RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})


class ModelError(Exception):
    """Raised when the model gave no usable answer; `reason` is one of `Reason`, `status` the last HTTP status."""

    def __init__(self, reason: Reason, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.status = status


# The wire format (only what we read; everything else the server sends is ignored) ------------------------------------


class _ChatMessage(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _ChatMessage


class _ChatCompletion(msgspec.Struct):
    choices: list[_Choice]


# A model's reply is outside input, however friendly the model.
_completion_decoder: BoundedJson[_ChatCompletion] = BoundedJson(_ChatCompletion)
_any_decoder: BoundedJson[Any] = BoundedJson()


def answer_text(body: bytes) -> str:
    """The first choice's text from a chat-completions response body; raises ModelError('malformed')."""
    try:
        completion = _completion_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ModelError("malformed", f"expected a chat completion, got {body[:200]!r}: {exc}") from None
    if not completion.choices or not completion.choices[0].message.content:
        raise ModelError("malformed", f"expected a choice with text, got {body[:200]!r}")
    return completion.choices[0].message.content


# One line per item ---------------------------------------------------------------------------------------------------

_NUMBERING = re.compile(r"^\s*(?:\d+[.):]|[-*•])\s+")


def prompt(template: str, items: list[str]) -> str:
    """The user message for `items`: `template` with `{items}` numbered one per line and `{count}` their number."""
    listed = "\n".join(f"{n}. {' '.join(item.split())}" for n, item in enumerate(items, 1))
    return template.replace("{count}", str(len(items))).replace("{items}", listed)


def parse_answer(text: str, count: int) -> list[str]:
    """One result per item from the model's answer: a JSON array of strings, or one line each (numbering, bullets
    and quotes stripped). Raises ModelError('malformed') unless there are exactly `count` non-empty results."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[-1].rsplit("```", 1)[0].strip()
    results: list[str] | None = None
    if body.startswith("["):
        with contextlib.suppress(ValueError, msgspec.DecodeError):
            parsed = _any_decoder.decode(body.encode())
            if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
                results = [x.strip() for x in parsed]
    if results is None:
        results = [_NUMBERING.sub("", line).strip().strip("\"'").strip() for line in body.splitlines()]
        results = [line for line in results if line]
    if len(results) != count or not all(results):
        raise ModelError("malformed", f"expected {count} line(s), one per item, got {len(results)}: {text[:200]!r}")
    return results


# Limits --------------------------------------------------------------------------------------------------------------


class RateLimit:
    """At most `per_minute` requests start in any 60 s window (0: no limit). Safe to share between threads."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._starts: deque[float] = deque()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a slot now and return 0, or take none and return how many seconds until one frees."""
        with self._lock:
            now = self._clock()
            while self._starts and self._starts[0] <= now - 60.0:
                self._starts.popleft()
            if self.per_minute <= 0 or len(self._starts) < self.per_minute:
                self._starts.append(now)
                return 0.0
            return self._starts[0] + 60.0 - now


@dataclass(frozen=True)
class Endpoint:
    """Where and how to ask: the server, the model and the knobs of one call."""

    base_url: str
    model: str
    api_key: str | None
    temperature: float
    max_tokens: int | None
    timeout_seconds: float
    retries: int
    retry_backoff_seconds: float
    max_retry_wait_seconds: float

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/chat/completions"


class ChatClient:
    """Sends chat completions to one endpoint; `stop()` makes waiting calls give up at once."""

    def __init__(self, endpoint: Endpoint, rate_limit: RateLimit) -> None:
        self.endpoint = endpoint
        self.rate_limit = rate_limit
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def probe(self) -> str | None:
        """Whether the endpoint answers at all (any HTTP status counts): None, or why not. One GET of
        `{base_url}/models`, never retried, at most 5 s. Blocks: run it on a thread."""
        request = urllib.request.Request(f"{self.endpoint.base_url.rstrip('/')}/models", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=min(self.endpoint.timeout_seconds, 5.0)):
                return None
        except urllib.error.HTTPError as exc:
            exc.close()
            return None
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            return "no answer within 5 s" if isinstance(reason, TimeoutError) else str(reason)

    def results(self, system: str, template: str, items: list[str]) -> list[str]:
        """One text per item: the model asked with `system` and the user `template` filled with `items` (see
        `prompt`), its answer read with `parse_answer`; raises ModelError. Blocks: run it on a thread."""
        return parse_answer(self.complete(system, prompt(template, items)), len(items))

    def complete(self, system: str, user: str) -> str:
        """The model's answer to one system + user prompt; raises ModelError. Blocks: run it on a thread."""
        body = json.dumps(self._body(system, user)).encode()
        attempt = 0
        while True:
            self._wait_for_rate_limit()
            try:
                return answer_text(self._post(body))
            except _Retry as retry:
                if attempt >= self.endpoint.retries:
                    raise retry.error from None
                attempt += 1
                self._sleep(retry.wait if retry.wait is not None else self._backoff(attempt))

    def _body(self, system: str, user: str) -> dict[str, object]:
        body: dict[str, object] = {
            "model": self.endpoint.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": self.endpoint.temperature,
            "stream": False,
        }
        if self.endpoint.max_tokens is not None:
            body["max_tokens"] = self.endpoint.max_tokens
        return body

    def _post(self, body: bytes) -> bytes:
        """One attempt; raises _Retry for what is worth another, ModelError for what is not."""
        request = urllib.request.Request(self.endpoint.url, data=body, method="POST", headers=self._headers())
        where = f"POST {self.endpoint.url}"
        try:
            with urllib.request.urlopen(request, timeout=self.endpoint.timeout_seconds) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            error = ModelError("http", f"{where}: HTTP {exc.code}: {_snippet(exc)}", exc.code)
            if exc.code in _RETRIED_STATUS:
                raise _Retry(error, _retry_after(exc.headers.get("Retry-After"))) from None
            raise error from None
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, TimeoutError):
                raise ModelError("timeout", f"{where}: no answer within {self.endpoint.timeout_seconds} s") from None
            raise _Retry(ModelError("network", f"{where}: {reason}"), None) from None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.endpoint.api_key:
            headers["Authorization"] = f"Bearer {self.endpoint.api_key}"
        return headers

    def _backoff(self, attempt: int) -> float:
        wait = self.endpoint.retry_backoff_seconds * 2.0 ** (attempt - 1)
        return min(wait, self.endpoint.max_retry_wait_seconds)

    def _wait_for_rate_limit(self) -> None:
        while (wait := self.rate_limit.reserve()) > 0:
            self._sleep(wait)

    def _sleep(self, seconds: float) -> None:
        if self._stopping.wait(min(seconds, self.endpoint.max_retry_wait_seconds)):
            raise ModelError("stopped", "the ai_analyzer is stopping")


class _Retry(Exception):
    """Raised by one attempt that is worth another: `error` if none is left, `wait` from Retry-After."""

    def __init__(self, error: ModelError, wait: float | None) -> None:
        super().__init__(error.detail)
        self.error = error
        self.wait = wait


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (a number, or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _snippet(error: urllib.error.HTTPError) -> str:
    try:
        text = error.read(300).decode(errors="replace")
    except OSError:
        return "(no body)"
    return " ".join(text.split()) or "(no body)"
