"""The scraper worker: extraction and HTTP against a local web server, then end to end with the real supervisor and
broker (refresh button, coalesced runs, conditional GET, errors counted while the last good list stays)."""

from __future__ import annotations

import gzip
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from conftest import ROOT, SupervisorFactory, SupervisorProcess
from support import Broker, MqttProbe, free_port, wait_until

from contracts.ai import AiReply
from contracts.homeassistant import Button, Sensor
from workers._scraping import Http, Item, Page, ScrapeError, Source, Validators, extract, fetch
from workers.scraper import Topics, entities, list_hash, next_delay, upcoming

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "scraper"
UTC_ZONE = ZoneInfo("UTC")
# The titles on stadium.html (with an en dash, as such pages have)
OLD_TOWN, HARBOUR, ROVERS = (
    f"Riverside FC \u2013 {team}" for team in ("Old Town United", "Harbour City", "Mountain Rovers")
)
ATHLETIC = "Riverside FC \u2013 Harbour Athletic"


def today() -> date:
    return datetime.now(UTC).date()


def day(offset: int) -> str:
    return (today() + timedelta(days=offset)).isoformat()


def page(name: str) -> bytes:
    """Fixture `name` with each `{{+3 %d.%m.%Y}}` replaced by today (UTC) plus 3 days in that format.

    Bytes pass through latin-1 untouched, so a page keeps its own encoding."""
    text = (FIXTURES / name).read_bytes().decode("latin-1")

    def dated(match: re.Match[str]) -> str:
        return (today() + timedelta(days=int(match[1]))).strftime(match[2])

    return re.sub(r"\{\{([+-]\d+) ([^}]+)\}\}", dated, text).encode("latin-1")


# A local web server standing in for the venues' sites ---------------------------------------------------------------


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "text/html"
    etag: str | None = None
    last_modified: str | None = None
    delay: float = 0.0  # seconds before answering (longer than the scraper's timeout: a slow server)
    gate: threading.Event | None = None  # when set, answer only once the test sets it
    gzip: bool = False


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    status: int = 0


@dataclass
class WebServer:
    """Serves `routes` on a free loopback port; records every request, and the most ever served at once."""

    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    most_at_once: int = 0
    _at_once: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def served(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                request = Request(self.path, dict(self.headers))
                with server._lock:
                    server.requests.append(request)
                    server._at_once += 1
                    server.most_at_once = max(server.most_at_once, server._at_once)
                try:
                    server.answer(self, self.server_route(), request)
                finally:
                    with server._lock:
                        server._at_once -= 1

            def server_route(self) -> Route:
                return server.routes.get(self.path, Route(status=404, body=b"not found"))

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, handler: BaseHTTPRequestHandler, route: Route, request: Request) -> None:
        if route.gate is not None and not route.gate.wait(15):
            raise AssertionError("the test never opened the gate")
        time.sleep(route.delay)
        validators = {"ETag": route.etag, "Last-Modified": route.last_modified}
        if route.etag is not None and handler.headers["If-None-Match"] == route.etag:
            status, body = 304, b""
        else:
            status, body = route.status, route.body
        if route.gzip:
            body = gzip.compress(body)
        request.status = status  # before the answer leaves: the client may look as soon as it has it
        try:
            handler.send_response(status)
            for name, value in validators.items():
                if value is not None:
                    handler.send_header(name, value)
            if route.gzip:
                handler.send_header("Content-Encoding", "gzip")
            handler.send_header("Content-Type", route.content_type)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout under test)
            pass

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def web() -> Iterator[WebServer]:
    server = WebServer()
    server.start()
    yield server
    for route in server.routes.values():
        if route.gate is not None:
            route.gate.set()
    server.stop()


# Sources as a user configures them ---------------------------------------------------------------------------------


def stadium(url: str, **changes: Any) -> dict[str, Any]:
    """Cards in a section; the date inside text ("Sun, 14.09.2024"), the kick-off sometimes "TBA"."""
    return {
        "name": "stadium",
        "url": url,
        "container": "section#fixtures",
        "items": "article.fixture",
        "fields": {
            "title": "h3.fixture__teams",
            "date": {"selector": ".fixture__date", "regex": r"\d{2}\.\d{2}\.\d{4}"},
            "time": ".fixture__kickoff",
            "competition": ".fixture__competition",
            "link": {"selector": "a.fixture__link", "attribute": "href"},
        },
        "date_format": "%d.%m.%Y",
        **changes,
    }


def arena(url: str) -> dict[str, Any]:
    """A table; date and time in a `<time datetime>` attribute; an ISO-8859-1 page."""
    return {
        "name": "arena",
        "url": url,
        "items": "table.events tr.event",
        "fields": {
            "title": "td.what a",
            "date": {"selector": "td.when time", "attribute": "datetime"},
            "doors": {"selector": "td.doors", "regex": r"(\d{1,2}(:\d{2})?) Uhr"},
        },
        "date_format": "iso",
    }


def theatre(url: str) -> dict[str, Any]:
    """A list; dates without a year, times inside text."""
    return {
        "name": "theatre",
        "url": url,
        "items": "li.termin",
        "fields": {
            "title": "h4",
            "date": {"selector": "p.datum", "regex": r"\d{2}\.\d{2}\."},
            "time": {"selector": "p.uhrzeit", "regex": r"\d{2}:\d{2}"},
        },
        "date_format": "%d.%m.",
    }


def api(url: str) -> dict[str, Any]:
    """A JSON API: the list at a dotted path, ISO 8601 date-times."""
    return {
        "name": "api",
        "url": url,
        "kind": "json",
        "items": "data.events",
        "fields": {"title": "name", "date": "startDate", "venue": "venue.name"},
        "date_format": "iso",
    }


def source(table: dict[str, Any]) -> Source:
    return msgspec.convert(table, Source)


def brief(items: list[Item]) -> list[tuple[str, str | None, str, str]]:
    return [(i.date, i.time, i.title, i.source) for i in items]


# Extraction -----------------------------------------------------------------------------------------------------------


def read(table: dict[str, Any], name: str, url: str = "http://venue.example/fixtures") -> list[Item]:
    body = page(name)
    extracted = extract(
        source(table), Page(body=body, url=url, charset=None, validators=Validators()), today(), UTC_ZONE
    )
    assert extracted.skipped == []
    return extracted.items


def test_a_card_layout_is_read_with_regex_dates_unknown_times_and_absolute_links() -> None:
    items = read(stadium("http://venue.example/fixtures"), "stadium.html")
    assert brief(items) == [
        (day(-3), "15:30", OLD_TOWN, "stadium"),
        (day(3), "18:30", HARBOUR, "stadium"),
        (day(10), None, ROVERS, "stadium"),
    ]
    assert items[1].start == f"{day(3)}T18:30:00+00:00"
    assert items[1].details == {"competition": "League", "link": "http://venue.example/matches/harbour-city"}


def test_a_table_layout_in_latin_1_is_read_from_time_attributes() -> None:
    items = read(arena("http://arena.example/programm/"), "arena.html")
    assert brief(items) == [
        (day(5), "20:00", "Rock Night", "arena"),
        (day(3), "19:30", "Kabarett Müller", "arena"),
    ]
    assert [i.details for i in items] == [{"doors": "19"}, {"doors": "18:30"}]


def test_a_list_layout_without_years_places_each_date_at_most_a_month_back() -> None:
    items = read(theatre("http://theatre.example/"), "theatre.html")
    assert brief(items) == [
        (day(2), "19:30", "Der zerbrochne Krug", "theatre"),
        (day(40), "16:00", "Die Zauberflöte", "theatre"),
    ]


@pytest.mark.parametrize(
    ("text", "on", "expected"),
    [
        ("05.01.", date(2024, 12, 20), date(2025, 1, 5)),  # January, seen in December: next year
        ("28.12.", date(2025, 1, 2), date(2024, 12, 28)),  # a few days ago, over new year: last year
        ("15.08.", date(2024, 1, 10), date(2024, 8, 15)),  # months ahead: this year
        ("20.11.", date(2024, 12, 15), date(2024, 11, 20)),  # less than a month ago: this year (then dropped as past)
        ("29.02.", date(2027, 3, 10), date(2028, 2, 29)),  # the next leap year
    ],
)
def test_a_date_without_a_year_takes_the_earliest_year_at_most_a_month_back(
    text: str, on: date, expected: date
) -> None:
    (item,) = extract(source(YEARLESS), yearless_page(text), on, UTC_ZONE).items
    assert item.date == expected.isoformat()


YEARLESS = {
    "name": "x",
    "url": "http://x.example/",
    "items": "li",
    "fields": {"title": "h4", "date": "p"},
    "date_format": "%d.%m.",
}


def yearless_page(text: str) -> Page:
    body = f"<ul><li><h4>Show</h4><p>{text}</p></li></ul>".encode()
    return Page(body=body, url="http://x.example/", charset="utf-8", validators=Validators())


def test_a_29_february_without_a_year_and_no_leap_year_near_is_skipped() -> None:
    with pytest.raises(
        ScrapeError, match=r"^parse: none of the 1 items could be read; item 1: date '29\.02\.' has no year"
    ):
        extract(source(YEARLESS), yearless_page("29.02."), date(2025, 2, 1), UTC_ZONE)


def test_a_json_api_is_read_by_dotted_paths_with_times_in_the_configured_zone() -> None:
    table = api("http://hall.example/api/events")
    extracted = extract(
        source(table),
        Page(body=page("events.json"), url="http://hall.example/", charset=None, validators=Validators()),
        today(),
        ZoneInfo("Europe/Berlin"),
    )
    jazz, quiz, cinema = extracted.items
    assert (jazz.title, jazz.details, jazz.start is not None) == ("Jazz Brunch", {"venue": "Small hall"}, True)
    assert jazz.time in ("12:00", "13:00")  # 11:00 UTC in Berlin, winter or summer
    assert (cinema.date, cinema.time, cinema.start) == (day(6), None, None)
    assert quiz.title == "Yesterday's Quiz"


def test_items_that_cannot_be_read_are_skipped_and_named() -> None:
    body = (
        b"<div class='e'><h3>Good</h3><span class='d'>2030-01-02</span></div>"
        b"<div class='e'><h3>No date</h3></div>"
        b"<div class='e'><h3>Bad date</h3><span class='d'>soon</span></div>"
    )
    table = {"name": "x", "url": "http://x.example/", "items": "div.e", "fields": {"title": "h3", "date": "span.d"}}
    extracted = extract(
        source(table), Page(body=body, url="", charset=None, validators=Validators()), today(), UTC_ZONE
    )
    assert [i.title for i in extracted.items] == ["Good"]
    assert extracted.skipped == [
        "item 2: no date (selector 'span.d')",
        "item 3: date 'soon' does not match date_format '%Y-%m-%d'",
    ]


@pytest.mark.parametrize(
    ("table", "body", "error"),
    [
        (stadium("http://x.example/"), "stadium-redesigned.html", r"^parse: container 'section#fixtures' not found: "),
        (stadium("http://x.example/"), b"", r"^parse: not an HTML page: Document is empty$"),
        (api("http://x.example/"), b"<html>maintenance</html>", r"^parse: not a JSON document: "),
        (
            api("http://x.example/"),
            b'{"data": {"events": {}}}',
            r"^parse: expected a list at items path 'data\.events', found dict$",
        ),
    ],
)
def test_a_page_that_is_not_what_the_source_expects_is_a_parse_error(
    table: dict[str, Any], body: str | bytes, error: str
) -> None:
    content = page(body) if isinstance(body, str) else body
    with pytest.raises(ScrapeError, match=error):
        extract(source(table), Page(body=content, url="", charset=None, validators=Validators()), today(), UTC_ZONE)


def test_a_page_with_no_events_gives_an_empty_list_not_an_error() -> None:
    assert read(stadium("http://x.example/"), "stadium-empty.html") == []


# The list, the schedule and the hash ----------------------------------------------------------------------------------


def test_upcoming_drops_past_items_and_duplicates_sorts_limits_and_names() -> None:
    def item(date_: str, title: str, time_: str | None = None, source_: str = "a") -> Item:
        return Item(title=title, date=date_, time=time_, source=source_)

    a = [item(day(2), "Late", "20:00"), item(day(-1), "Past"), item(day(0), "Today"), item(day(2), "Early", "09:00")]
    b = [item(day(2), "Late", "20:00", "b"), item(day(5), "Later", None, "b"), item(day(9), "Cut off", None, "b")]
    result = upcoming([a, b], today(), {"Today": "Now!"}, max_items=4)
    assert [(i.title, i.source, i.short_title) for i in result] == [
        ("Today", "a", "Now!"),
        ("Early", "a", None),
        ("Late", "a", None),
        ("Later", "b", None),
    ]


def test_the_next_run_comes_after_the_interval_plus_at_most_the_jitter() -> None:
    assert next_delay(3600, 60, lambda: 0.0) == 3600
    assert next_delay(3600, 60, lambda: 0.5) == 3630
    assert 3600 <= next_delay(3600, 60) < 3660


def test_the_list_hash_changes_with_the_content_and_the_topic() -> None:
    assert list_hash("a/events", b"[1]") == list_hash("a/events", b"[1]")
    assert list_hash("a/events", b"[1]") != list_hash("a/events", b"[2]")
    assert list_hash("a/events", b"[1]") != list_hash("b/events", b"[1]")


def test_the_declared_entities_are_the_count_next_last_run_and_a_refresh_button() -> None:
    topics = Topics(
        events="b/scraper/events",
        next="b/scraper/events/next",
        last_run="b/scraper/events/last_run",
        ai_reply="b/scraper/ai_reply",
        ai_request="b/ai/request",
    )
    declared = {e.object_id: e for e in entities(topics, "b/cmd/scraper/refresh")}
    assert sorted(declared) == ["events_count", "last_run", "next_event", "refresh"]
    refresh, last_run, next_event = declared["refresh"], declared["last_run"], declared["next_event"]
    assert isinstance(refresh, Button) and refresh.command_topic == "b/cmd/scraper/refresh"
    assert isinstance(last_run, Sensor) and last_run.device_class == "timestamp"
    assert isinstance(next_event, Sensor) and next_event.json_attributes_topic == "b/scraper/events/next"


# HTTP -----------------------------------------------------------------------------------------------------------------

HTTP = Http(timeout_seconds=5.0, retries=2, backoff_seconds=0.01, user_agent="scraper-test/1", max_bytes=10_000)


NO_VALIDATORS = Validators()


def get(url: str, validators: Validators = NO_VALIDATORS, http: Http = HTTP) -> Page | None:
    return fetch(url, validators, http, {"Accept-Language": "de"}, threading.Event())


def test_fetch_sends_its_user_agent_and_validators_and_a_304_gives_nothing(web: WebServer) -> None:
    web.routes["/p"] = Route(body=b"<p>hi</p>", etag='"v1"', last_modified="Wed, 01 Jan 2025 10:00:00 GMT")
    first = get(web.url("/p"))
    assert first is not None and first.body == b"<p>hi</p>"
    assert first.validators == Validators(etag='"v1"', last_modified="Wed, 01 Jan 2025 10:00:00 GMT")
    assert get(web.url("/p"), first.validators) is None
    plain, conditional = web.served("/p")
    assert (plain.headers["User-Agent"], plain.headers["Accept-Language"]) == ("scraper-test/1", "de")
    assert "If-None-Match" not in plain.headers
    assert (conditional.headers["If-None-Match"], conditional.status) == ('"v1"', 304)
    assert conditional.headers["If-Modified-Since"] == "Wed, 01 Jan 2025 10:00:00 GMT"


def test_fetch_retries_a_5xx_then_reports_its_status(web: WebServer) -> None:
    web.routes["/p"] = Route(status=503, body=b"busy")
    with pytest.raises(
        ScrapeError, match=r"^http_status: 503 Service Unavailable from http://127\.0\.0\.1:\d+/p \(after 3 attempts\)$"
    ):
        get(web.url("/p"))
    assert len(web.served("/p")) == 3


def test_fetch_does_not_retry_a_404(web: WebServer) -> None:
    with pytest.raises(ScrapeError, match=r"^http_status: 404 Not Found from http://127\.0\.0\.1:\d+/gone$"):
        get(web.url("/gone"))
    assert len(web.served("/gone")) == 1


def test_fetch_gives_up_on_a_slow_server_as_a_network_error(web: WebServer) -> None:
    web.routes["/slow"] = Route(body=b"late", delay=1.0)
    started = time.monotonic()
    with pytest.raises(ScrapeError, match=r"^network: .*/slow: timed out \(after 2 attempts\)$"):
        get(web.url("/slow"), http=msgspec.structs.replace(HTTP, timeout_seconds=0.3, retries=1))
    assert time.monotonic() - started < 1.5


def test_fetch_reports_a_host_that_refuses_connections() -> None:
    url = f"http://127.0.0.1:{free_port()}/p"
    with pytest.raises(
        ScrapeError,
        match=r"^network: cannot reach http://127\.0\.0\.1:\d+/p: .*Connection refused.* \(after 3 attempts\)$",
    ):
        get(url)


@pytest.mark.parametrize("compressed", [False, True])
def test_fetch_refuses_a_body_over_max_bytes_even_when_compressed(web: WebServer, compressed: bool) -> None:
    web.routes["/big"] = Route(body=b"x" * 20_000, gzip=compressed)
    with pytest.raises(ScrapeError, match=r"^network: .*/big: the response is larger than max_bytes \(10000 bytes\)$"):
        get(web.url("/big"))


def test_fetch_inflates_a_gzip_body(web: WebServer) -> None:
    web.routes["/z"] = Route(body=b"<p>small</p>", gzip=True)
    fetched = get(web.url("/z"))
    assert fetched is not None and fetched.body == b"<p>small</p>"
    assert web.served("/z")[0].headers["Accept-Encoding"] == "gzip"


def test_stopping_cuts_a_retry_backoff_short(web: WebServer) -> None:
    web.routes["/p"] = Route(status=500)
    stopping = threading.Event()
    threading.Timer(0.2, stopping.set).start()
    started = time.monotonic()
    with pytest.raises(ScrapeError, match=r"^network: http://127\.0\.0\.1:\d+/p: the worker is stopping$"):
        fetch(web.url("/p"), Validators(), msgspec.structs.replace(HTTP, backoff_seconds=30), {}, stopping)
    assert time.monotonic() - started < 5


# Configuration ------------------------------------------------------------------------------------------------------


def check_config(supervisors: SupervisorFactory, table: dict[str, Any], sources: list[dict[str, Any]]) -> str:
    path = supervisors.config({"scraper": table}, supervisor={"worker_packages": ["workers"]})
    path.write_text(path.read_text() + sources_toml("workers.scraper", sources))
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "--config", str(path), "--check-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    return done.stderr.strip()


@pytest.mark.parametrize(
    ("table", "changes", "error"),
    [
        ({"interval_seconds": 5}, {}, r"\[workers\.scraper\] interval_seconds: expected int >= 60, got 5$"),
        (
            {"timezone": "Mars/Olympus"},
            {},
            r"workers\.scraper: timezone: expected an IANA time zone such as 'Europe/Berlin', found 'Mars/Olympus'",
        ),
        (
            {},
            {"items": "article..fixture"},
            r"\[workers\.scraper\.sources\] \[0\]: source 'stadium': items: "
            r"invalid CSS selector 'article\.\.fixture' \(Expected ident, found <DELIM '\.' at 8>\)",
        ),
        (
            {},
            {"url": "file:///etc/passwd"},
            r"\[workers\.scraper\.sources\] \[0\]: source 'stadium': url: "
            r"expected an http:// or https:// URL, found 'file:///etc/passwd'",
        ),
        (
            {},
            {"fields": {"title": "h3"}},
            r"\[workers\.scraper\.sources\] \[0\]: source 'stadium': fields: expected a selector for date",
        ),
    ],
)
def test_a_bad_scraper_section_is_a_config_error_naming_the_key(
    supervisors: SupervisorFactory, table: dict[str, Any], changes: dict[str, Any], error: str
) -> None:
    message = check_config(supervisors, table, [stadium("http://x.example/") | changes])
    # (the config loader appends the whole offending table to a message about more than one key)
    assert re.match(r"^error: \S+/config-0\.toml: " + error, message), message


# End to end: the real supervisor and broker ------------------------------------------------------------------------

# A timeout far above any good response on a busy machine: a timed-out request is retried, and the tests count requests.
FAST = {"timeout_seconds": 10.0, "retries": 1, "retry_backoff_seconds": 0.05, "short_names": False}


def sources_toml(table: str, sources: list[dict[str, Any]]) -> str:
    """`[[<table>.sources]]` arrays of tables (the test config writer knows no lists of tables)."""

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    lines = []
    for entry in sources:
        lines.append(f"[[{table}.sources]]")
        lines.extend(f"{k} = {value(v)}" for k, v in entry.items())
    return "\n".join(lines) + "\n"


@dataclass
class Scraper:
    """A running supervisor with the scraper, and where to look."""

    process: SupervisorProcess
    mqtt: MqttProbe
    base: str

    @property
    def events(self) -> str:
        return f"{self.base}/scraper/events"

    def lists(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.mqtt.received(self.events)]

    def titles(self, number: int = -1) -> list[str]:
        return [item["title"] for item in self.lists()[number]["items"]]

    def runs(self, count: int = 1, predicate: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """Wait for `count` last-run reports (matching `predicate`); returns every one so far."""
        self.mqtt.wait_for(
            f"{self.events}/last_run", lambda m: predicate is None or predicate(m.json()), count=count, timeout=10
        )
        return [m.json() for m in self.mqtt.received(f"{self.events}/last_run")]

    def refresh(self) -> None:
        self.mqtt.publish(f"{self.base}/cmd/scraper/refresh", "PRESS")

    def status(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        found = self.mqtt.wait_for(f"{self.base}/status", lambda m: predicate(m.json()), timeout=10)
        return dict(found[-1].json())


def start(
    supervisors: SupervisorFactory,
    mqtt: MqttProbe,
    sources: list[dict[str, Any]],
    packages: tuple[str, ...] = ("workers",),
    others: dict[str, dict[str, Any]] | None = None,
    subscribe: bool = True,
    tables: dict[str, dict[str, Any]] | None = None,
    **options: Any,
) -> Scraper:
    if subscribe:  # (again would replay the retained messages)
        mqtt.subscribe(f"{supervisors.prefix}/#")
    original = supervisors.config

    def config(workers: dict[str, dict[str, Any]], **tables: dict[str, Any]) -> Path:
        path = original(workers, **tables)
        path.write_text(path.read_text() + sources_toml("workers.scraper", sources))
        return path

    availability = f"{supervisors.base}/availability"
    births = len(mqtt.received(availability, lambda m: m.text == "online"))
    supervisors.config = config  # type: ignore[method-assign]
    try:
        workers = {"scraper": {**FAST, **options}, **(others or {})}
        process = supervisors.start(workers, supervisor={"worker_packages": list(packages)}, **(tables or {}))
    finally:
        supervisors.config = original  # type: ignore[method-assign]
    mqtt.wait_for(availability, lambda m: m.text == "online", count=births + 1)  # subscribed: commands arrive
    return Scraper(process, mqtt, supervisors.base)


def retained(broker: Broker, topic: str) -> Any:
    """The retained payload on `topic` as a new subscriber sees it, decoded from JSON."""
    probe = MqttProbe(broker.port)
    try:
        probe.subscribe(topic)
        return probe.wait_for(topic, lambda m: m.retain)[0].json()
    finally:
        probe.close()


def test_events_from_two_venue_layouts_and_an_api_are_published_retained_with_count_and_next(
    supervisors: SupervisorFactory, mqtt: MqttProbe, broker: Broker, web: WebServer
) -> None:
    web.routes["/stadium"] = Route(body=page("stadium.html"))
    web.routes["/arena"] = Route(body=page("arena.html"))
    web.routes["/api"] = Route(body=page("events.json"), content_type="application/json")
    scraper = start(supervisors, mqtt, [stadium(web.url("/stadium")), arena(web.url("/arena")), api(web.url("/api"))])
    (run,) = scraper.runs()
    assert (run["trigger"], run["changed"], run["failed_sources"]) == ("startup", True, [])
    expected = [
        (day(3), "18:30", HARBOUR, "stadium"),
        (day(3), "19:30", "Kabarett Müller", "arena"),
        (day(4), "11:00", "Jazz Brunch", "api"),
        (day(5), "20:00", "Rock Night", "arena"),
        (day(6), None, "Open Air Cinema", "api"),
        (day(10), None, ROVERS, "stadium"),
    ]
    listed = retained(broker, scraper.events)
    assert listed["count"] == 6
    assert [(i["date"], i.get("time"), i["title"], i["source"]) for i in listed["items"]] == expected
    assert retained(broker, f"{scraper.events}/next") == listed["items"][0]
    status = scraper.status(lambda s: s["workers"]["scraper"].get("last_run_trigger") == "startup")
    assert (status["event_count"], status["workers"]["scraper"]["interval_seconds"]) == (6, 3600)
    assert web.requests[0].headers["User-Agent"].startswith("mqtt-home-supervisor-scraper/")


def test_a_page_with_no_events_publishes_an_empty_list_and_no_error(
    supervisors: SupervisorFactory, mqtt: MqttProbe, web: WebServer
) -> None:
    web.routes["/stadium"] = Route(body=page("stadium-empty.html"))
    scraper = start(supervisors, mqtt, [stadium(web.url("/stadium"))])
    scraper.runs()
    assert scraper.lists() == [{"count": 0, "items": []}]
    assert mqtt.received(f"{scraper.events}/next")[0].json() == {}
    status = scraper.status(lambda s: s["workers"]["scraper"].get("last_run_trigger") == "startup")
    assert (status["scrape_error_count"], status["workers"]["scraper"]["errors"], status["event_count"]) == (0, {}, 0)


def test_the_refresh_button_runs_again_and_only_a_changed_list_is_republished(
    supervisors: SupervisorFactory, mqtt: MqttProbe, web: WebServer
) -> None:
    web.routes["/stadium"] = Route(body=page("stadium.html"))
    scraper = start(supervisors, mqtt, [stadium(web.url("/stadium"))])
    scraper.runs()
    scraper.refresh()
    runs = scraper.runs(2)
    assert [(r["trigger"], r["changed"]) for r in runs] == [("startup", True), ("command", False)]
    assert len(scraper.lists()) == 1
    web.routes["/stadium"] = Route(body=page("stadium.html").replace(b"Harbour City", b"Harbour Athletic"))
    scraper.refresh()
    assert scraper.runs(3)[-1]["changed"] is True
    assert len(scraper.lists()) == 2
    assert scraper.titles() == [ATHLETIC, ROVERS]
    scraper.status(lambda s: s["workers"]["scraper"].get("last_run_trigger") == "command")
    assert len(web.served("/stadium")) == 3


def test_a_refresh_during_a_run_makes_exactly_one_more_run_never_a_parallel_one(
    supervisors: SupervisorFactory, mqtt: MqttProbe, web: WebServer
) -> None:
    gate = threading.Event()
    web.routes["/stadium"] = Route(body=page("stadium.html"), gate=gate)
    scraper = start(supervisors, mqtt, [stadium(web.url("/stadium"))])
    wait_until(lambda: web.served("/stadium"), 10, "the startup run's request")
    for _ in range(3):
        scraper.refresh()
    scraper.process.wait_log("command run asked while a run is under way: one more run follows it", count=3)
    gate.set()
    runs = scraper.runs(predicate=lambda run: run["next_run"] is not None)  # idle: nothing more to run
    assert [(r["trigger"], r["next_run"] is None) for r in runs] == [("startup", True), ("command", False)]
    assert (len(web.served("/stadium")), web.most_at_once) == (2, 1)


def test_a_304_republishes_nothing_and_a_restart_asks_conditionally_without_republishing(
    supervisors: SupervisorFactory, mqtt: MqttProbe, web: WebServer
) -> None:
    web.routes["/stadium"] = Route(
        body=page("stadium.html"), etag='"abc"', last_modified="Mon, 06 Jan 2025 08:00:00 GMT"
    )
    scraper = start(supervisors, mqtt, [stadium(web.url("/stadium"))])
    scraper.runs()
    scraper.refresh()
    assert scraper.runs(2)[-1]["changed"] is False
    scraper.process.signal(signal.SIGTERM)
    assert scraper.process.wait() == 0
    again = start(supervisors, mqtt, [stadium(web.url("/stadium"))], subscribe=False)
    runs = again.runs(3)
    assert [(r["trigger"], r["changed"]) for r in runs] == [("startup", True), ("command", False), ("startup", False)]
    assert len(scraper.lists()) == 1
    assert [(r.headers.get("If-None-Match"), r.status) for r in web.served("/stadium")] == [
        (None, 200),
        ('"abc"', 304),
        ('"abc"', 304),
    ]


def stadium_error(web: WebServer, kind: str) -> None:
    web.routes["/stadium"] = {
        "500": Route(status=500, body=b"Internal Server Error"),
        "timeout": Route(body=page("stadium.html"), delay=3.0),
        "broken": Route(body=page("stadium-redesigned.html")),
    }[kind]


@pytest.mark.parametrize(
    ("kind", "detail", "requests"),
    [
        ("500", r"http_status: 500 Internal Server Error from http://127\.0\.0\.1:\d+/stadium \(after 2 attempts\)", 2),
        ("timeout", r"network: http://127\.0\.0\.1:\d+/stadium: timed out \(after 2 attempts\)", 2),
        ("broken", r"parse: container 'section#fixtures' not found: has the page layout changed\?", 1),
    ],
)
def test_an_error_is_counted_by_kind_and_the_last_good_list_stays(
    supervisors: SupervisorFactory,
    mqtt: MqttProbe,
    broker: Broker,
    web: WebServer,
    kind: str,
    detail: str,
    requests: int,
) -> None:
    web.routes["/stadium"] = Route(body=page("stadium.html"))
    options: dict[str, Any] = {"timeout_seconds": 1.0} if kind == "timeout" else {}  # the slow page takes 3 s
    scraper = start(supervisors, mqtt, [stadium(web.url("/stadium"))], **options)
    scraper.runs()
    good = retained(broker, scraper.events)
    stadium_error(web, kind)
    scraper.refresh()
    run = scraper.runs(2)[-1]
    assert (run["trigger"], run["changed"], run["failed_sources"]) == ("command", False, ["stadium"])
    status = scraper.status(lambda s: s["workers"]["scraper"]["errors"].get("scrape") == 1)
    assert status["scrape_error_count"] == 1
    assert status["event_count"] == 2
    assert retained(broker, scraper.events) == good
    assert len(scraper.lists()) == 1
    assert len(web.served("/stadium")) == 1 + requests
    log_line = rf"WARNING worker scraper\[\d+\] workers\.scraper: error \(scrape\): {detail} \(source 'stadium'\)$"
    assert re.search(log_line, scraper.process.log(), re.MULTILINE), scraper.process.log()[-3000:]


def test_short_titles_from_the_ai_analyzer_are_merged_into_the_list(
    supervisors: SupervisorFactory, mqtt: MqttProbe, web: WebServer, prefix: str
) -> None:
    web.routes["/stadium"] = Route(body=page("stadium.html"))
    base = supervisors.base
    # The echo test worker stands in for the ai_analyzer: it shows the (local-only) request on the broker.
    echo = {"topics": [f"{base}/ai/request"], "out": f"{prefix}/out", "qos": 1}
    scraper = start(
        supervisors, mqtt, [stadium(web.url("/stadium"))], ("workers", "testworkers"), {"echo": echo}, short_names=True
    )
    (asked,) = mqtt.wait_for(f"{prefix}/out/echo")
    request = json.loads(asked.json()["payload"])
    assert (request["task"], request["reply_to"]) == ("shorten", f"{base}/scraper/ai_reply")
    assert request["items"] == [HARBOUR, ROVERS]
    stranger = AiReply(id="someone-else", task="shorten", results=["?", "?"])
    reply = AiReply(id=request["id"], task="shorten", results=["vs Harbour", "vs Rovers"], model="test")
    mqtt.publish(request["reply_to"], msgspec.json.encode(stranger))
    mqtt.publish(request["reply_to"], msgspec.json.encode(reply))
    mqtt.wait_for(scraper.events, count=2)
    assert [item.get("short_title") for item in scraper.lists()[-1]["items"]] == ["vs Harbour", "vs Rovers"]
    assert mqtt.wait_for(f"{scraper.events}/next", count=2)[-1].json()["short_title"] == "vs Harbour"
    scraper.refresh()
    scraper.runs(2)
    assert len(mqtt.received(f"{prefix}/out/echo")) == 1  # known short titles are not asked for again
    assert len(scraper.lists()) == 2


def test_the_entities_reach_home_assistant_and_its_refresh_button_runs_the_scraper(
    supervisors: SupervisorFactory, mqtt: MqttProbe, web: WebServer, prefix: str
) -> None:
    web.routes["/stadium"] = Route(body=page("stadium.html"))
    ha = {"homeassistant": {"discovery_prefix": f"{prefix}/ha", "status_topic": f"{prefix}/ha/status"}}
    scraper = start(supervisors, mqtt, [stadium(web.url("/stadium"))], others={"ha_responder": {}}, tables=ha)
    node = f"sup-{prefix.replace('/', '-')}"

    def discovered(component: str, object_id: str) -> dict[str, Any]:
        topic = f"{prefix}/ha/{component}/{node}/scraper_{object_id}/config"
        return dict(mqtt.wait_for(topic, lambda m: bool(m.payload))[-1].json())

    count, next_event = discovered("sensor", "events_count"), discovered("sensor", "next_event")
    last_run, button = discovered("sensor", "last_run"), discovered("button", "refresh")
    assert (count["state_topic"], count["value_template"]) == (scraper.events, "{{ value_json.count }}")
    assert next_event["json_attributes_topic"] == next_event["state_topic"] == f"{scraper.events}/next"
    assert last_run["device_class"] == "timestamp"
    assert {a["topic"] for a in button["availability"]} == {
        f"{scraper.base}/availability",
        f"{scraper.base}/worker/scraper/availability",
    }
    scraper.runs()
    mqtt.publish(button["command_topic"], button.get("payload_press", "PRESS"))  # what Home Assistant sends
    assert scraper.runs(2)[-1]["trigger"] == "command"


def test_the_shipped_example_source_works_offline_and_never_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor import config
    from workers._scraping import Validators, scrape

    monkeypatch.chdir(ROOT)  # the example's file: URL is relative to the working directory, as under the unit
    settings = config.load(ROOT / "deploy" / "config.toml", {})
    (scraper,) = [w for w in settings.workers if w.name == "scraper"]
    (source,) = [s for s in scraper.config.sources if s.name == "example"]  # type: ignore[attr-defined]
    for today in (date(2026, 12, 1), date(2027, 6, 30)):
        outcome = scrape(source, Validators(), scraper.config.http(), today, ZoneInfo("UTC"), threading.Event())  # type: ignore[attr-defined]
        assert outcome.error is None
        assert outcome.items is not None
        assert len(outcome.items) == 6
        upcoming = [item for item in outcome.items if date.fromisoformat(item.date) >= today]
        assert len(upcoming) >= 4  # a date just past stays in this year; the rest come within the year


def test_a_restart_republishes_nothing_when_the_short_titles_came_from_the_rules(
    supervisors: SupervisorFactory, mqtt: MqttProbe, web: WebServer
) -> None:
    # No model answers: the ai_analyzer's rules make the short titles. They are kept, so that after a restart the
    # list is the same one and not published again (twice: without short titles, then with them).
    web.routes["/stadium"] = Route(body=page("stadium.html"))
    analyzer = {"ai_analyzer": {"base_url": "http://127.0.0.1:9/v1", "timeout_seconds": 1.0, "retries": 0}}
    first = start(supervisors, mqtt, [stadium(web.url("/stadium"))], others=analyzer, short_names=True)
    mqtt.wait_for(first.events, count=2)  # the list, then the list with short titles
    assert all(item.get("short_title") for item in first.lists()[-1]["items"])
    first.process.signal(signal.SIGTERM)
    assert first.process.wait() == 0
    published, seen = len(first.lists()), len(mqtt.messages)
    again = start(supervisors, mqtt, [stadium(web.url("/stadium"))], others=analyzer, subscribe=False, short_names=True)
    again.runs(2)  # the first run's (before the restart) and the startup run after it

    def handled_the_reply() -> bool:  # the rules' short titles came back to the new scraper
        statuses = [m.json() for m in mqtt.messages[seen:] if m.topic == f"{supervisors.base}/status"]
        return any(status["workers"]["scraper"]["handled"] >= 1 for status in statuses)

    wait_until(handled_the_reply, 10, "the scraper to take the short titles")
    assert len(again.lists()) == published
