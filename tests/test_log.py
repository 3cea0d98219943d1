"""Secret masking in the log processor chain."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog

from common.log import _SECRET_KEYS, _mask_secrets, configure_logging

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


def test_a_secret_containing_another_is_masked_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # The shorter one first in the environment: replacing it first left the longer
    # secret's tail readable.
    monkeypatch.setenv("A_SHORT_TOKEN", "tok-2024")
    monkeypatch.setenv("B_LONG_TOKEN", "tok-2024-9e8d7c6b5a")
    assert mask(event="auth tok-2024-9e8d7c6b5a / tok-2024") == {"event": "auth *** / ***"}


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
