"""structlog set-up: one JSON object per line, and secrets masked on the way out."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(key|token|secret|password|passwd|apikey)", re.IGNORECASE)
# The password of a URL such as postgresql://user:password@host/db.
_URL_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^/@\s]+@")


def _mask_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask values of secret-looking keys, known secrets inside any text value, and the
    passwords of URLs."""
    secrets = _known_secrets()
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key) and not key.endswith("_env"):
            event[key] = "***"
        elif isinstance(value, str):
            masked = _URL_PASSWORD.sub(r"\1***@", value) if "://" in value else value
            for s in secrets:
                masked = masked.replace(s, "***")
            if masked != value:
                event[key] = masked
    return event


# Secrets read from files at start (FEEDFLEET_PULSAR_TOKEN_FILE), not in the environment.
_file_secrets: set[str] = set()


def add_secret(value: str) -> None:
    """Mask ``value`` in every log line from now on, as a secret from the environment is."""
    if len(value) >= 6:
        _file_secrets.add(value)


def _known_secrets() -> list[str]:
    # Longest first: a secret containing another is masked whole, not left with its tail.
    found = [
        v
        for k, v in os.environ.items()
        if len(v) >= 6 and _SECRET_KEYS.search(k) and not k.endswith("_ENV")
    ]
    return sorted([*found, *_file_secrets], key=len, reverse=True)


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _mask_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
