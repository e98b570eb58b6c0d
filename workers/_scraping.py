"""Scraping one source for the scraper worker: fetching its page and reading dated items out of it.

`fetch` does the HTTP (a conditional GET with a timeout, retries with backoff, a User-Agent and a size limit);
`extract` turns the page into `Item`s with the source's configured selectors (CSS for HTML, dotted paths for JSON)
and date and time formats. Both run on a background thread and touch nothing but the web. Every failure is one
`ScrapeError`, whose `category` (network, http_status, parse) is what the worker counts.
"""

from __future__ import annotations

import re
import threading
import urllib.error
import urllib.request
import zlib
from datetime import date, datetime, time, timedelta
from http.client import HTTPException
from typing import Any, Literal
from zoneinfo import ZoneInfo

import cssselect
import msgspec

from contracts.decoding import BoundedJson

Category = Literal["network", "http_status", "parse"]
REQUIRED_FIELDS = ("title", "date")
_YEARLESS_AFTER = timedelta(days=31)  # a date without a year is at most this far in the past


class ScrapeError(Exception):
    """Raised when a source cannot be fetched or read; `category` says which (network, http_status, parse) and
    `retryable` whether trying again soon may help (network trouble, 429, 5xx)."""

    def __init__(self, category: Category, detail: str, *, retryable: bool = False) -> None:
        self.category = category
        self.detail = detail
        self.retryable = retryable
        super().__init__(f"{category}: {detail}")


# Configuration of a source ----------------------------------------------------------------------------------------


class Field(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where one field of an item is: a CSS selector inside the item (HTML) or a dotted path inside it (JSON).

    An empty selector means the item itself. `attribute` takes that HTML attribute instead of the text (e.g.
    `datetime` of a `<time>`, `href` of a link, made absolute). `regex` keeps only the first match, or its first
    group when it has one (e.g. `\\d+\\.\\d+\\.\\d{4}` out of "Sat, 14.09.2024").
    """

    selector: str = ""
    attribute: str | None = None
    regex: str | None = None


class Source(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One page to scrape: a `[[workers.scraper.sources]]` table.

    `items` selects every item: a CSS selector (kind `html`) or the dotted path to the list (kind `json`, empty
    for a document that is the list). `fields` maps each field name to a selector string or a `Field` table;
    `title` and `date` are required, `time` is optional, any other field is kept in the item's `details`.
    `date_format` and `time_format` are `strptime` formats, or `iso` for ISO 8601 (a date-time also gives the time).
    """

    name: str
    url: str
    kind: Literal["html", "json"] = "html"
    container: str | None = None  # html: a CSS selector that must match, else the layout changed (a parse error)
    items: str
    fields: dict[str, str | Field]
    date_format: str = "%Y-%m-%d"
    time_format: str = "%H:%M"
    headers: dict[str, str] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"source {self.name!r}"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ValueError(f"{where}: expected a name of letters, digits, _ and - (it is used in topics and logs)")
        if not (self.url.startswith(("http://", "https://")) or _is_local_page(self.url)):
            raise ValueError(f"{where}: url: expected an http:// or https:// URL, found {self.url!r}")
        missing = [name for name in REQUIRED_FIELDS if name not in self.fields]
        if missing:
            raise ValueError(f"{where}: fields: expected a selector for {' and '.join(missing)}")
        if self.kind == "json" and self.container is not None:
            raise ValueError(f"{where}: container applies to kind 'html' only; point items at the list instead")
        if self.kind == "html":
            _check_selector(where, "items", self.items, empty=False)
            if self.container is not None:
                _check_selector(where, "container", self.container, empty=False)
        for name in self.fields:
            field = self.field(name)
            if self.kind == "html":
                _check_selector(where, f"fields.{name}", field.selector, empty=True)
            elif field.attribute is not None:
                raise ValueError(f"{where}: fields.{name}: attribute applies to kind 'html' only")
            if field.regex is not None:
                _check_regex(where, f"fields.{name}", field.regex)

    def field(self, name: str) -> Field:
        spec = self.fields[name]
        return Field(selector=spec) if isinstance(spec, str) else spec


def _is_local_page(url: str) -> bool:
    """`file:<relative path>`, a page kept next to the installation (the shipped example); no other file is read."""
    path = url.removeprefix("file:")
    return url.startswith("file:") and bool(path) and not path.startswith("/") and ".." not in path.split("/")


def _check_selector(where: str, key: str, selector: str, *, empty: bool) -> None:
    if not selector:
        if empty:
            return
        raise ValueError(f"{where}: {key}: expected a CSS selector such as 'div.event', found an empty string")
    try:
        cssselect.HTMLTranslator().css_to_xpath(selector)
    except cssselect.SelectorError as exc:
        problem = str(exc).replace(", got ", ", found ")  # the config loader appends its own ", got"
        raise ValueError(f"{where}: {key}: invalid CSS selector {selector!r} ({problem})") from None


def _check_regex(where: str, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: {key}: invalid regex {pattern!r} ({exc})") from None


class Http(msgspec.Struct, frozen=True, kw_only=True):
    """How to fetch: per-attempt timeout, retries after the first attempt, backoff doubling from
    `backoff_seconds`, the User-Agent, and the largest body accepted."""

    timeout_seconds: float
    retries: int
    backoff_seconds: float
    user_agent: str
    max_bytes: int


# Fetching ----------------------------------------------------------------------------------------------------------


class Validators(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the server said identifies its last response: sent back to get a 304 when nothing changed."""

    etag: str | None = None
    last_modified: str | None = None


class Page(msgspec.Struct, frozen=True, kw_only=True):
    body: bytes
    url: str  # after redirects: links are made absolute against it
    charset: str | None
    validators: Validators


def fetch(
    url: str, validators: Validators, http: Http, extra_headers: dict[str, str], stopping: threading.Event
) -> Page | None:
    """GET `url`, conditionally on `validators`; None when the server answers 304 Not Modified.

    Network errors, 429 and 5xx are tried again `http.retries` times, waiting `backoff_seconds`, then twice as long
    each time; `stopping` cuts a wait short. Raises ScrapeError.
    """
    attempt = 0
    while True:
        try:
            return _get(url, validators, http, extra_headers)
        except ScrapeError as exc:
            if not exc.retryable or attempt >= http.retries:
                if not attempt:
                    raise
                raise ScrapeError(exc.category, f"{exc.detail} (after {attempt + 1} attempts)") from None
        if stopping.wait(http.backoff_seconds * 2**attempt):
            raise ScrapeError("network", f"{url}: the worker is stopping")
        attempt += 1


def _get(url: str, validators: Validators, http: Http, extra_headers: dict[str, str]) -> Page | None:
    headers = {"User-Agent": http.user_agent, "Accept-Encoding": "gzip", **extra_headers}
    if validators.etag:
        headers["If-None-Match"] = validators.etag
    if validators.last_modified:
        headers["If-Modified-Since"] = validators.last_modified
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=http.timeout_seconds) as response:
            body = _read_limited(response, url, http.max_bytes)
            return Page(
                body=body,
                url=response.geturl(),
                charset=response.headers.get_content_charset(),
                validators=Validators(etag=response.headers["ETag"], last_modified=response.headers["Last-Modified"]),
            )
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 304:
            return None
        retryable = exc.code == 429 or exc.code >= 500
        raise ScrapeError("http_status", f"{exc.code} {exc.reason} from {url}", retryable=retryable) from None
    except urllib.error.URLError as exc:
        raise ScrapeError("network", f"cannot reach {url}: {_reason(exc.reason)}", retryable=True) from None
    except (OSError, HTTPException) as exc:  # timeouts while reading, resets, broken responses
        raise ScrapeError("network", f"{url}: {_reason(exc)}", retryable=True) from None


def _reason(exc: object) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, Exception) else str(exc)


def _read_limited(response: Any, url: str, limit: int) -> bytes:
    too_large = ScrapeError("network", f"{url}: the response is larger than max_bytes ({limit} bytes)")
    declared = response.headers["Content-Length"]
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    body: bytes = response.read(limit + 1)
    if len(body) > limit:
        raise too_large
    if response.headers["Content-Encoding"] == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise ScrapeError("network", f"{url}: broken gzip body: {exc}") from None
        if len(body) > limit or inflater.unconsumed_tail:
            raise too_large
    return body


# Extracting --------------------------------------------------------------------------------------------------------


class Item(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One item (an event) as published: `date` (ISO 8601) and `time` (HH:MM) are local to the configured time
    zone; `start` joins them with its offset when the time is known."""

    title: str
    date: str
    time: str | None = None
    start: str | None = None
    source: str
    short_title: str | None = None
    details: dict[str, str] = msgspec.field(default_factory=dict)


class Extracted(msgspec.Struct, frozen=True, kw_only=True):
    """The items read from one page, and why any others were skipped."""

    items: list[Item]
    skipped: list[str]


Record = dict[str, str | None]  # one item's raw field texts, by field name


def extract(source: Source, page: Page, today: date, zone: ZoneInfo) -> Extracted:
    """Read `source`'s items out of `page`. A date without a year is placed in the year that puts it at most a month
    before `today`. Raises ScrapeError (parse) when the page is not what the source expects."""
    records = _html_records(source, page) if source.kind == "html" else _json_records(source, page)
    items: list[Item] = []
    skipped: list[str] = []
    for number, record in enumerate(records, start=1):
        try:
            items.append(_item(source, record, today, zone))
        except ValueError as exc:
            skipped.append(f"item {number}: {exc}")
    if records and not items:
        raise ScrapeError("parse", f"none of the {len(records)} items could be read; {skipped[0]}")
    return Extracted(items=items, skipped=skipped)


def _html_records(source: Source, page: Page) -> list[Record]:
    # Imported here: the supervisor imports every worker module to discover it, and lxml costs it ~6 MiB.
    from lxml import etree, html  # type: ignore[import-untyped]
    from lxml.cssselect import CSSSelector  # type: ignore[import-untyped]

    try:
        root = html.document_fromstring(page.body, parser=html.HTMLParser(encoding=page.charset))
    except (etree.ParserError, LookupError, ValueError) as exc:
        raise ScrapeError("parse", f"not an HTML page: {exc}") from None
    root.make_links_absolute(page.url, handle_failures="ignore")
    scope = root
    if source.container is not None:
        found = CSSSelector(source.container, translator="html")(root)
        if not found:
            raise ScrapeError("parse", f"container {source.container!r} not found: has the page layout changed?")
        scope = found[0]
    selectors = {name: source.field(name) for name in source.fields}
    compiled = {name: CSSSelector(f.selector, translator="html") for name, f in selectors.items() if f.selector}
    records = []
    for element in CSSSelector(source.items, translator="html")(scope):
        record: Record = {}
        for name, field in selectors.items():
            matches = compiled[name](element) if name in compiled else [element]
            if not matches:
                record[name] = None
            elif field.attribute is not None:
                record[name] = matches[0].get(field.attribute)
            else:
                record[name] = matches[0].text_content()
        records.append(record)
    return records


_page_decoder: BoundedJson[Any] = BoundedJson()  # the size is bounded by the fetch


def _json_records(source: Source, page: Page) -> list[Record]:
    try:
        document = _page_decoder.decode(page.body)
    except msgspec.DecodeError as exc:
        raise ScrapeError("parse", f"not a JSON document: {exc}") from None
    found = _at_path(document, source.items)
    if not isinstance(found, list):
        what = "nothing" if found is None else type(found).__name__
        raise ScrapeError("parse", f"expected a list at items path {source.items!r}, found {what}")
    records = []
    for entry in found:
        record: Record = {}
        for name in source.fields:
            value = _at_path(entry, source.field(name).selector)
            record[name] = None if value is None or isinstance(value, (dict, list)) else str(value)
        records.append(record)
    return records


def _at_path(document: Any, path: str) -> Any:
    """The value at dotted `path` (`data.events`, `dates.0.start`) inside `document`, or None."""
    for part in path.split(".") if path else []:
        if isinstance(document, dict):
            document = document.get(part)
        elif isinstance(document, list) and part.isdigit() and int(part) < len(document):
            document = document[int(part)]
        else:
            return None
    return document


def _item(source: Source, record: Record, today: date, zone: ZoneInfo) -> Item:
    text = {name: _cleaned(source.field(name), record.get(name)) for name in source.fields}
    title, date_text = text["title"], text["date"]
    if not title:
        raise ValueError(f"no title (selector {source.field('title').selector!r})")
    if not date_text:
        raise ValueError(f"no date (selector {source.field('date').selector!r})")
    day, clock = _date(date_text, source.date_format, today, zone)
    time_text = text.get("time")
    if time_text:
        clock = _time(time_text, source.time_format) or clock  # "TBA" and the like leave the time unknown
    details = {name: value for name, value in text.items() if name not in ("title", "date", "time") and value}
    return Item(
        title=title,
        date=day.isoformat(),
        time=clock.strftime("%H:%M") if clock else None,
        start=datetime.combine(day, clock, tzinfo=zone).isoformat() if clock else None,
        source=source.name,
        details=details,
    )


def _cleaned(field: Field, value: str | None) -> str:
    text = " ".join((value or "").split())
    if field.regex is not None and text:
        match = re.search(field.regex, text)
        text = "" if match is None else (match.group(1) if match.re.groups else match.group(0))
    return text


def _date(text: str, fmt: str, today: date, zone: ZoneInfo) -> tuple[date, time | None]:
    """The day of `text` and, for an ISO 8601 date-time, its time of day (in `zone`); raises ValueError."""
    if fmt == "iso":
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"date {text!r} is not ISO 8601") from None
        if moment.tzinfo is not None:
            moment = moment.astimezone(zone)
        has_time = "T" in text or " " in text  # "2024-09-14" is a day, "2024-09-14T18:30" a moment
        return moment.date(), moment.time().replace(second=0, microsecond=0) if has_time else None
    if "%Y" in fmt or "%y" in fmt:
        try:
            return datetime.strptime(text, fmt).date(), None
        except ValueError:
            raise ValueError(f"date {text!r} does not match date_format {fmt!r}") from None
    return _yearless(text, fmt, today), None


def _yearless(text: str, fmt: str, today: date) -> date:
    """A day given without a year: the earliest of last, this and next year's that is at most a month ago."""
    try:
        parsed = datetime.strptime(f"{text} 2000", f"{fmt} %Y")  # 2000 is a leap year: 29.02. parses
    except ValueError:
        raise ValueError(f"date {text!r} does not match date_format {fmt!r}") from None
    for year in (today.year - 1, today.year, today.year + 1):
        try:
            candidate = parsed.date().replace(year=year)
        except ValueError:  # 29 February of a common year
            continue
        if candidate >= today - _YEARLESS_AFTER:
            return candidate
    raise ValueError(f"date {text!r} has no year and no 29 February near {today.isoformat()}")


def _time(text: str, fmt: str) -> time | None:
    try:
        return datetime.strptime(text, fmt).time()
    except ValueError:
        return None


# One source, start to end ------------------------------------------------------------------------------------------


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What scraping one source gave: new `items` (with the validators of their response), nothing new (`items`
    None: a 304), or an `error`; `skipped` says which items of a page could not be read."""

    source: str
    items: list[Item] | None = None
    validators: Validators = Validators()
    skipped: list[str] = msgspec.field(default_factory=list)
    error: ScrapeError | None = None


def scrape(
    source: Source, validators: Validators, http: Http, today: date, zone: ZoneInfo, stopping: threading.Event
) -> Outcome:
    """Fetch `source` (conditionally on `validators`) and extract its items; never raises ScrapeError."""
    try:
        page = fetch(source.url, validators, http, source.headers, stopping)
        if page is None:
            return Outcome(source=source.name)
        extracted = extract(source, page, today, zone)
    except ScrapeError as exc:
        return Outcome(source=source.name, error=exc)
    return Outcome(source=source.name, items=extracted.items, validators=page.validators, skipped=extracted.skipped)
