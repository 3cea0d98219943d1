"""Secret masking in the log processor chain."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import structlog

from common import log as log_module
from common.log import _SECRET_KEYS, _mask_secrets, add_secret, configure_logging

SECRET = "pk-live-7f3a9c2e"


@pytest.fixture(autouse=True)
def only_our_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Secret-looking variables of the machine running the tests would mask our strings."""
    for name in [n for n in os.environ if _SECRET_KEYS.search(n)]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FEEDFLEET_TEST_API_KEY", SECRET)


def mask(**event: Any) -> dict[str, Any]:
    return dict(_mask_secrets(None, "info", dict(event)))


@pytest.mark.parametrize(
    "key",
    ["key", "api_key", "apikey", "ApiKey", "token", "access_token", "accessToken", "secret",
     "client_secret", "password", "DB_PASSWORD", "passwd", "x-api-key"],
)  # fmt: skip
def test_values_of_secret_looking_keys_are_masked(key: str) -> None:
    assert mask(event="login", **{key: "hunter2"}) == {"event": "login", key: "***"}


def test_the_whole_value_is_masked_whatever_its_type() -> None:
    assert mask(token=None, key=12345, secret=["a", "b"]) == {
        "token": "***",
        "key": "***",
        "secret": "***",
    }


def test_a_key_containing_a_secret_word_is_masked_too() -> None:
    # Substring match on purpose (as Django's settings filter does): "monkey" is masked
    # along with "accessToken" and "x-api-key"; a lost field is cheaper than a leak.
    assert mask(monkey="banana") == {"monkey": "***"}


def test_keys_naming_the_environment_variable_are_not_masked() -> None:
    # ``api_key_env`` holds the variable's name, which operators need to see.
    event = {"api_key_env": "POLYGON_API_KEY", "token_env": "REFINITIV_TOKEN"}
    assert mask(**event) == event


def test_everything_else_is_left_exactly_as_it_was() -> None:
    event = {
        "event": "subscribed",
        "provider": "polygon",
        "symbols": ["AAPL", "MSFT"],
        "count": 3,
        "ratio": 0.5,
        "error": "connection refused by 127.0.0.1:8080",
        "url": "wss://socket.polygon.io/stocks",
        "enabled": True,
        "last_error": None,
    }
    got = mask(**event)
    assert got == event
    assert [type(v) for v in got.values()] == [type(v) for v in event.values()]


def test_a_known_secret_is_masked_inside_longer_strings() -> None:
    got = mask(
        event=f"connecting with {SECRET} to the feed",
        error=f"401 for https://api.example/q?apikey={SECRET}&symbol=AAPL ({SECRET})",
        provider="alphavantage",
    )
    assert got == {
        "event": "connecting with *** to the feed",
        "error": "401 for https://api.example/q?apikey=***&symbol=AAPL (***)",
        "provider": "alphavantage",
    }


def test_which_environment_values_count_as_known_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_TOKEN", "abc12")  # under 6 characters: too common to mask
    monkeypatch.setenv("FEEDFLEET_KEY_ENV", "refinitiv-token-var")  # names a variable
    monkeypatch.setenv("FEEDFLEET_HOST", "worker-host-1")  # not a secret-looking name
    message = "abc12 refinitiv-token-var worker-host-1"
    assert mask(event=message) == {"event": message}


def test_a_six_character_value_is_a_known_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_TOKEN", "abc123")
    assert mask(event="token abc123 sent") == {"event": "token *** sent"}


def test_a_secret_inside_another_is_masked_whole_wherever_it_sits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The inner secret sorts after the outer one alphabetically: only length decides.
    monkeypatch.setenv("A_INNER_TOKEN", "zz-2024-inner")
    monkeypatch.setenv("B_OUTER_TOKEN", "aa-zz-2024-inner-9e8d")
    assert mask(event="auth aa-zz-2024-inner-9e8d / zz-2024-inner") == {"event": "auth *** / ***"}


def test_a_secret_containing_another_is_masked_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # The shorter one first in the environment: replacing it first left the longer
    # secret's tail readable.
    monkeypatch.setenv("A_SHORT_TOKEN", "tok-2024")
    monkeypatch.setenv("B_LONG_TOKEN", "tok-2024-9e8d7c6b5a")
    assert mask(event="auth tok-2024-9e8d7c6b5a / tok-2024") == {"event": "auth *** / ***"}


@contextlib.contextmanager
def bare_root_logger() -> Iterator[logging.Logger]:
    """``logging.basicConfig`` does nothing while the root logger has handlers (pytest adds
    its own for each test phase): remove them for the block, then put them back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.handlers.clear()
    root.setLevel(logging.WARNING)
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def configured() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back for the other tests."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_configured_chain_masks_messages_fields_and_exceptions(
    configured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "info")
    log = structlog.get_logger("feedfleet.test")
    log.info(f"using {SECRET}", password="hunter2", symbol="AAPL", api_key_env="X_API_KEY")
    try:
        raise RuntimeError(f"provider refused key {SECRET}")
    except RuntimeError:
        log.exception("connect_failed", provider="polygon")
    out = capsys.readouterr().err
    assert SECRET not in out
    first, second = (orjson.loads(line) for line in out.splitlines())
    assert (first["event"], first["password"], first["symbol"], first["api_key_env"]) == (
        "using ***",
        "***",
        "AAPL",
        "X_API_KEY",
    )
    assert (second["event"], second["provider"]) == ("connect_failed", "polygon")
    assert second["exception"].splitlines()[-1] == "RuntimeError: provider refused key ***"


def emit_one_of_each() -> tuple[datetime, datetime]:
    """Log at each level through structlog and through a stdlib logger; return the UTC
    times just before and after."""
    before = datetime.now(UTC)
    log = structlog.get_logger("feedfleet.test")
    log.debug("s_debug")
    log.info("s_info", symbol="AAPL")
    log.warning("s_warning")
    lib = logging.getLogger("feedfleet.test.stdlib")
    lib.debug("lib debug")
    lib.info("lib %s", "info")
    lib.warning("lib warning")
    return before, datetime.now(UTC)


def json_lines(out: str, before: datetime, after: datetime) -> list[Any]:
    """Each structlog line as its JSON object without the timestamp (checked here: ISO
    8601 in UTC, written as Z, between ``before`` and ``after``); stdlib lines as text."""
    got: list[Any] = []
    for line in out.splitlines():
        if not line.startswith("{"):
            got.append(line)
            continue
        obj = orjson.loads(line)
        stamp = obj.pop("timestamp")
        assert isinstance(stamp, str) and stamp.endswith("Z"), stamp
        assert before <= datetime.fromisoformat(stamp) <= after, (before, stamp, after)
        got.append(obj)
    return got


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("debug", ["debug", "info", "warning"]),
        ("info", ["info", "warning"]),
        ("WARNING", ["warning"]),
    ],
)
def test_json_output_one_object_per_line_at_the_configured_level(
    configured: None, capsys: pytest.CaptureFixture[str], level: str, shown: list[str]
) -> None:
    with bare_root_logger():
        configure_logging("json", level)
        before, after = emit_one_of_each()
    expected: dict[str, list[Any]] = {
        "debug": [{"event": "s_debug", "level": "debug"}],
        "info": [{"event": "s_info", "level": "info", "symbol": "AAPL"}],
        "warning": [{"event": "s_warning", "level": "warning"}],
    }
    # Other libraries' stdlib records: the bare message, filtered at the same level.
    stdlib = {"debug": ["lib debug"], "info": ["lib info"], "warning": ["lib warning"]}
    got = json_lines(capsys.readouterr().err, before, after)
    assert got == [e for n in shown for e in expected[n]] + [m for n in shown for m in stdlib[n]]


def test_json_at_info_is_the_default(configured: None, capsys: pytest.CaptureFixture[str]) -> None:
    with bare_root_logger():
        configure_logging()
        before, after = emit_one_of_each()
    assert json_lines(capsys.readouterr().err, before, after) == [
        {"event": "s_info", "level": "info", "symbol": "AAPL"},
        {"event": "s_warning", "level": "warning"},
        "lib info",
        "lib warning",
    ]


def test_console_output_is_one_plain_line_per_event(
    configured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with bare_root_logger():
        configure_logging("console", "info")
        before, after = emit_one_of_each()
    lines = capsys.readouterr().err.splitlines()
    # No colour codes: the output goes to files and journald, not only to terminals.
    pattern = re.compile(r"(\S+) \[(\w+) *\] (\w+)(?: +(symbol=AAPL))?")
    parsed = [m.groups() if (m := pattern.fullmatch(line)) else line for line in lines]
    assert [p[1:3] for p in parsed[:2]] == [("info", "s_info"), ("warning", "s_warning")]
    assert (parsed[0][3], parsed[1][3]) == ("symbol=AAPL", None)
    for p in parsed[:2]:
        assert p[0].endswith("Z") and before <= datetime.fromisoformat(p[0]) <= after, p
    assert parsed[2:] == ["lib info", "lib warning"]


def test_an_unknown_level_name_falls_back_to_info_when_logging_is_already_set_up(
    configured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # With handlers on the root logger, basicConfig leaves it alone and does not check the
    # name; structlog's own filter must still get a level.
    root = logging.getLogger()
    handler = logging.NullHandler()
    root.addHandler(handler)
    try:
        configure_logging("json", "verbose")
        log = structlog.get_logger("feedfleet.test")
        log.debug("s_debug")
        log.info("s_info")
    finally:
        root.removeHandler(handler)
    lines = capsys.readouterr().err.splitlines()
    assert [orjson.loads(line)["event"] for line in lines] == ["s_info"]


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (
            "connect postgresql://feed:s3cr3t@db:5432/x failed",
            "connect postgresql://feed:***@db:5432/x failed",
        ),
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("pulsar://broker:6650", "pulsar://broker:6650"),
        ("http://host:8080/q?mail=a@b.c", "http://host:8080/q?mail=a@b.c"),
        ("user:pass@host without a scheme", "user:pass@host without a scheme"),
    ],
)
def test_url_passwords_are_masked(text: str, masked: str) -> None:
    assert _mask_secrets(None, "info", {"event": text}) == {"event": masked}


def test_a_secret_read_from_a_file_is_masked_from_then_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token read from a file (FEEDFLEET_PULSAR_TOKEN_FILE) is in no environment variable:
    add_secret makes it a known secret, from six characters on, as the environment's are."""
    monkeypatch.setattr(log_module, "_file_secrets", set())
    assert mask(event="sent tok123 and abcde") == {"event": "sent tok123 and abcde"}
    add_secret("tok123")
    add_secret("abcde")  # too short to be told from ordinary words: not masked
    assert mask(event="sent tok123 and abcde") == {"event": "sent *** and abcde"}
    assert log_module._file_secrets == {"tok123"}
