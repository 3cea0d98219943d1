"""Types every provider codec shares."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from common.model import RawMarketData


class CodecError(ValueError):
    """Bytes or a message that is not valid protocol for this provider."""


@dataclass(slots=True)
class DecodeError:
    """One part of an input that could not be decoded; decoding goes on after it."""

    reason: str
    raw: str


@dataclass(slots=True)
class CaptureError:
    """A failure in a capture file, located for an operator (``line 12``, ``offset 4096``)."""

    location: str
    reason: str


class CaptureDecoder(Protocol):
    """What ``feedfleet decode PROVIDER`` calls: a codec's ``decode_capture``."""

    def __call__(
        self, data: bytes, *, symbol: str | None = None
    ) -> Iterator[RawMarketData | CaptureError]: ...


def clip(value: Any, limit: int = 300) -> str:
    """A short printable form of a bad input, for logs and error reports."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = orjson.dumps(value).decode()
        except TypeError:
            text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
