"""Settings from ``FEEDFLEET_*`` environment variables.

Secrets (API keys, the API token, the Pulsar token) are read from the environment (or a
file it names) only, never from the database; provider rows name the variable that holds
their key.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from common.log import add_secret

DEFAULT_TOPIC = "persistent://public/default/raw-market-data"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


def _choice(name: str, choices: tuple[str, ...]) -> str:
    value = _env(name, choices[0]) or choices[0]
    if value not in choices:
        raise SystemExit(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _retention_days(name: str, default: int | None) -> int | None:
    """Whole days, or None to keep forever (``0`` or ``none``)."""
    value = (_env(name) or "").strip().lower()
    if not value:
        return default
    if value == "none":
        return None
    if not value.isdigit():
        raise SystemExit(f"{name} must be a whole number of days, 0 or none, got {value!r}")
    return int(value) or None


def _integer(name: str, default: int) -> int:
    value = _env(name, str(default)) or str(default)
    if not value.isdigit():
        raise SystemExit(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _port(name: str) -> int | None:
    value = _env(name)
    if value is None:
        return None
    if not value.isdigit() or int(value) > 65535:
        raise SystemExit(f"{name} must be a port number (0-65535), got {value!r}")
    return int(value)


TLS_SCHEME = "pulsar+ssl://"


@dataclass(frozen=True, slots=True)
class PulsarAccess:
    """Where the Pulsar broker is and how to prove who we are to it.

    ``token``: a JWT for Pulsar's token authentication (kept out of ``repr`` so it cannot
    reach a log line). ``tls_trust_certs``: the CA file the broker's certificate is checked
    against, used with a ``pulsar+ssl://`` URL only (without it, the system's CAs).
    """

    url: str
    token: str | None = field(default=None, repr=False)
    tls_trust_certs: Path | None = None
    tls_validate_hostname: bool = True

    @property
    def uses_tls(self) -> bool:
        return self.url.startswith(TLS_SCHEME)

    @classmethod
    def from_env(cls, url: str, environ: Mapping[str, str] | None = None) -> PulsarAccess:
        """``url`` with the token and TLS settings of ``FEEDFLEET_PULSAR_*``. A token file is
        read here, once, at start; a missing or empty one is a clear error (SystemExit)."""
        env = os.environ if environ is None else environ
        token = env.get("FEEDFLEET_PULSAR_TOKEN") or None
        token_file = env.get("FEEDFLEET_PULSAR_TOKEN_FILE") or None
        if token and token_file:
            raise SystemExit("set FEEDFLEET_PULSAR_TOKEN or FEEDFLEET_PULSAR_TOKEN_FILE, not both")
        if token_file:
            token = _read_token_file(token_file)
        trust = env.get("FEEDFLEET_PULSAR_TLS_TRUST_CERTS") or None
        if trust and not url.startswith(TLS_SCHEME):
            raise SystemExit(
                f"FEEDFLEET_PULSAR_TLS_TRUST_CERTS is set but the Pulsar URL is not "
                f"{TLS_SCHEME}... ({url}): use the broker's TLS port, e.g. "
                f"{TLS_SCHEME}broker:6651"
            )
        if trust and not Path(trust).is_file():
            raise SystemExit(f"FEEDFLEET_PULSAR_TLS_TRUST_CERTS: no such file: {trust}")
        validate = (env.get("FEEDFLEET_PULSAR_TLS_VALIDATE_HOSTNAME") or "true").lower()
        if validate not in ("true", "false", "1", "0", "yes", "no"):
            raise SystemExit(
                f"FEEDFLEET_PULSAR_TLS_VALIDATE_HOSTNAME must be true or false, got {validate!r}"
            )
        return cls(
            url=url,
            token=token,
            tls_trust_certs=Path(trust) if trust else None,
            tls_validate_hostname=validate in ("true", "1", "yes"),
        )


def _read_token_file(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(
            f"FEEDFLEET_PULSAR_TOKEN_FILE: cannot read {path}: {exc.strerror or exc}"
        ) from None
    if not token:
        raise SystemExit(f"FEEDFLEET_PULSAR_TOKEN_FILE: {path} is empty")
    # Not in the environment, so the log's masking must be told of it.
    add_secret(token)
    return token


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    redis_url: str
    pulsar_url: str
    pulsar_topic: str = DEFAULT_TOPIC
    # The token and TLS settings for pulsar_url (its url is pulsar_url's); None: neither.
    pulsar_access: PulsarAccess | None = None
    pulsar_send_timeout_ms: int = 10_000
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    # One token, or several separated by commas while one replaces another.
    api_token: str | None = None
    # "token" (the default): a non-loopback API needs a token; "none" opens it on purpose.
    api_auth: str = "token"
    log_format: str = "json"
    log_level: str = "info"
    # The workers' write-ahead journals, one directory per provider under it.
    journal_dir: Path = Path("var/journal")
    journal_fsync: str = "interval"  # always | interval | never (see common/journal.py)
    journal_max_bytes: int = 2 * 1024**3
    host: str = field(default_factory=socket.gethostname)
    # raw_market_data's retention: hourly partitions wholly older than this many days are
    # dropped (or detached) by the active coordinator; None keeps everything. From the
    # environment it is 7 unless set; built in code (tests, tools) it keeps everything.
    retention_days: int | None = None
    retention_mode: str = "drop"  # drop | detach (see common/retention.py)
    # A worker's own Prometheus exposition (workers/metrics_endpoint.py); None: not served.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None

    @classmethod
    def from_env(cls) -> Settings:
        missing = [
            n
            for n in ("FEEDFLEET_DATABASE_URL", "FEEDFLEET_REDIS_URL", "FEEDFLEET_PULSAR_URL")
            if not _env(n)
        ]
        if missing:
            raise SystemExit(
                f"missing environment: {', '.join(missing)} "
                "(`feedfleet run` starts embedded services and sets them)"
            )
        port = _env("FEEDFLEET_API_PORT", "8080") or "8080"
        if not port.isdigit():
            raise SystemExit(f"FEEDFLEET_API_PORT must be a port number, got {port!r}")
        return cls(
            database_url=_env("FEEDFLEET_DATABASE_URL") or "",
            redis_url=_env("FEEDFLEET_REDIS_URL") or "",
            pulsar_url=_env("FEEDFLEET_PULSAR_URL") or "",
            pulsar_access=PulsarAccess.from_env(_env("FEEDFLEET_PULSAR_URL") or ""),
            pulsar_topic=_env("FEEDFLEET_PULSAR_TOPIC", DEFAULT_TOPIC) or DEFAULT_TOPIC,
            pulsar_send_timeout_ms=int(_env("FEEDFLEET_PULSAR_SEND_TIMEOUT_MS", "10000") or 0),
            api_host=_env("FEEDFLEET_API_HOST", "127.0.0.1") or "127.0.0.1",
            api_port=int(port),
            api_token=_env("FEEDFLEET_API_TOKEN"),
            api_auth=_choice("FEEDFLEET_API_AUTH", ("token", "none")),
            log_format=_env("FEEDFLEET_LOG_FORMAT", "json") or "json",
            log_level=_env("FEEDFLEET_LOG_LEVEL", "info") or "info",
            # FEEDFLEET_SPOOL_DIR is the journal's former name, still honoured.
            journal_dir=Path(
                _env("FEEDFLEET_JOURNAL_DIR") or _env("FEEDFLEET_SPOOL_DIR") or "var/journal"
            ),
            journal_fsync=_choice("FEEDFLEET_JOURNAL_FSYNC", ("interval", "always", "never")),
            journal_max_bytes=_integer("FEEDFLEET_JOURNAL_MAX_BYTES", 2 * 1024**3),
            host=_env("FEEDFLEET_HOST") or socket.gethostname(),
            retention_days=_retention_days("FEEDFLEET_RETENTION_DAYS", 7),
            retention_mode=_choice("FEEDFLEET_RETENTION_MODE", ("drop", "detach")),
            metrics_host=_env("FEEDFLEET_METRICS_HOST", "127.0.0.1") or "127.0.0.1",
            metrics_port=_port("FEEDFLEET_METRICS_PORT"),
        )

    @property
    def pulsar(self) -> PulsarAccess:
        """How to reach pulsar_url: with the token and TLS settings read at start, if any."""
        if self.pulsar_access is None:
            return PulsarAccess(self.pulsar_url)
        # pulsar_url is what tests and tools override: it wins over the url read at start.
        return replace(self.pulsar_access, url=self.pulsar_url)
