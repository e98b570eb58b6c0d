"""Decoding bytes from outside, bounded: a size limit and a nesting limit before any parser sees them.

Every payload from the broker (or from a web page, a model, another worker) is hostile until decoded. msgspec and
the json module both recurse once per nesting level, so a payload nested 10,000 levels deep raises RecursionError
from either; `check_json` refuses it first, cheaply: a payload with fewer brackets than the limit cannot be nested
deeper than it, so the common case costs two `bytes.count` calls. Failures are `InputRejected`, a
`msgspec.DecodeError`, so every place that already counts undecodable input as `decode` counts these too.
"""

from __future__ import annotations

import re
from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")

MAX_DEPTH = 32  # nesting levels: far more than any message here needs, far less than the interpreter's recursion
_TOKENS = re.compile(rb'\\.|["\[\]{}]')


class InputRejected(msgspec.DecodeError):
    """Raised when input from outside is larger or nested deeper than its limit, before it is parsed."""


def check_json(data: bytes | bytearray | memoryview, max_bytes: int | None = None, max_depth: int = MAX_DEPTH) -> None:
    """Raise InputRejected when `data` is longer than `max_bytes` or its arrays and objects nest deeper than
    `max_depth` (brackets inside strings do not count)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise InputRejected(f"{len(data)} bytes, more than the {max_bytes} allowed")
    raw = bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return
    depth = 0
    in_string = False
    for token in _TOKENS.findall(raw):
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:  # inside a string, or an escape (only valid inside one)
            continue
        elif token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise InputRejected(f"nested deeper than {max_depth} levels")
        else:
            depth -= 1


class BoundedJson(Generic[T]):
    """A JSON decoder for `type` that refuses input over `max_bytes` or nested deeper than `max_depth` first.

    Use it instead of `msgspec.json.Decoder` (or `json.loads`) for anything that comes from outside."""

    def __init__(self, type: type[T] | Any = Any, max_bytes: int | None = None, max_depth: int = MAX_DEPTH) -> None:
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(type)
        self._max_bytes = max_bytes
        self._max_depth = max_depth

    def decode(self, data: bytes | bytearray | memoryview) -> T:
        """The decoded value; raises msgspec.DecodeError (InputRejected for the limits) or ValidationError."""
        check_json(data, self._max_bytes, self._max_depth)
        return self._decoder.decode(data)
