"""Types every provider codec shares."""

from __future__ import annotations

import reprlib
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


# What a codec's last-resort guard puts before its reason. A record that gets there failed
# in a way the codec did not foresee: the rest of the frame is kept, and the fuzz tests
# (tests/test_codec_fuzz.py) fail on any such error so the case gets narrow handling.
UNEXPECTED = "unexpected "

# Bounded in depth and width: input nested past the recursion limit must still print.
_REPR = reprlib.Repr()
_REPR.maxlevel = 4
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 120
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 20


def clip(value: Any, limit: int = 300) -> str:
    """A short printable form of a bad input, for logs and error reports. Never raises."""
    if isinstance(value, bytes | bytearray):
        # A UTF-8 character is at most 4 bytes: this prefix holds more than ``limit``.
        text = bytes(value[: limit * 4 + 4]).decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = orjson.dumps(value).decode()
        except TypeError:  # not JSON (or nested too deep for orjson): a bounded repr
            text = _short_repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if not text.isascii():
        # Lone surrogates (from a str input) would make the report itself unwritable.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def brief(value: Any, limit: int = 60) -> str:
    """``value`` as it may appear inside an error reason: short, repr-like, never raising."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    return clip(value, limit)


def as_text(value: Any, default: str = "") -> str:
    """A text field of untrusted JSON as a str: ``str()`` of a deeply nested value raises
    RecursionError, so anything but a string (or null) is given in its clipped form."""
    if type(value) is str:
        return value
    return default if value is None else clip(value)


def _short_repr(value: Any) -> str:
    try:
        return _REPR.repr(value)
    except Exception:  # e.g. an int past the str-conversion digit limit
        return f"<{type(value).__name__}>"


def unexpected(exc: Exception, raw: Any) -> DecodeError:
    """The error for a record a codec's last-resort guard caught."""
    try:
        text = str(exc)
    except Exception:  # an exception whose arguments do not print
        text = ""
    return DecodeError(f"{UNEXPECTED}{type(exc).__name__}: {clip(text, 100)}", clip(raw))
