"""Pulsar token authentication and TLS: the settings, the client's arguments built from
them, and a real connection over TLS with a token.

pulsar-lite (the embedded broker) speaks neither TLS nor token authentication: it accepts a
Connect command whatever its credentials. So the real connection goes through a
TLS-terminating relay in front of it, with a certificate made here by openssl, and the
relay records the Connect command the client sent: the test sees the client check the
broker's certificate (and refuse a wrong CA or host name) and send the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pulsar
import pytest

from common.config import PulsarAccess, Settings
from common.embedded import EmbeddedProcess, free_port, pulsar_command
from common.log import _mask_secrets
from common.pulsar_client import new_pulsar_client, pulsar_client_args

TOKEN = "eyJhbGciOiJIUzI1NiJ9.test-token-" + uuid.uuid4().hex
TLS_URL = "pulsar+ssl://broker.internal:6651"


def test_token_from_the_environment() -> None:
    access = PulsarAccess.from_env("pulsar://broker:6650", {"FEEDFLEET_PULSAR_TOKEN": TOKEN})
    assert access.token == TOKEN
    args = pulsar_client_args(access)
    assert isinstance(args.pop("authentication"), pulsar.AuthenticationToken)
    # A plain URL: no TLS arguments at all.
    assert args == {"service_url": "pulsar://broker:6650"}


def test_token_from_a_file_read_once_at_start(tmp_path: Path) -> None:
    token_file = tmp_path / "pulsar.token"
    token_file.write_text(TOKEN + "\n")
    access = PulsarAccess.from_env(TLS_URL, {"FEEDFLEET_PULSAR_TOKEN_FILE": str(token_file)})
    token_file.write_text("changed-after-start")
    assert access.token == TOKEN
    assert isinstance(pulsar_client_args(access)["authentication"], pulsar.AuthenticationToken)


def test_no_token_no_authentication() -> None:
    args = pulsar_client_args(PulsarAccess.from_env("pulsar://broker:6650", {}))
    assert args == {"service_url": "pulsar://broker:6650"}


def test_tls_arguments_only_with_a_pulsar_ssl_url(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    access = PulsarAccess.from_env(TLS_URL, {"FEEDFLEET_PULSAR_TLS_TRUST_CERTS": str(ca)})
    assert pulsar_client_args(access) == {
        "service_url": TLS_URL,
        "tls_trust_certs_file_path": str(ca),
        "tls_validate_hostname": True,
    }
    off = PulsarAccess.from_env(TLS_URL, {"FEEDFLEET_PULSAR_TLS_VALIDATE_HOSTNAME": "false"})
    # No CA file: the system's CAs.
    assert pulsar_client_args(off) == {"service_url": TLS_URL, "tls_validate_hostname": False}
    # Settings the URL does not use never reach the client.
    plain = PulsarAccess("pulsar://broker:6650", tls_trust_certs=ca)
    assert pulsar_client_args(plain) == {"service_url": "pulsar://broker:6650"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FEEDFLEET_PULSAR_TOKEN_FILE": "/nonexistent/pulsar.token"},
         "FEEDFLEET_PULSAR_TOKEN_FILE: cannot read /nonexistent/pulsar.token: "
         "No such file or directory"),
        ({"FEEDFLEET_PULSAR_TOKEN": "a", "FEEDFLEET_PULSAR_TOKEN_FILE": "/x"},
         "set FEEDFLEET_PULSAR_TOKEN or FEEDFLEET_PULSAR_TOKEN_FILE, not both"),
        ({"FEEDFLEET_PULSAR_TLS_TRUST_CERTS": "/nonexistent/ca.pem"},
         "FEEDFLEET_PULSAR_TLS_TRUST_CERTS: no such file: /nonexistent/ca.pem"),
        ({"FEEDFLEET_PULSAR_TLS_VALIDATE_HOSTNAME": "maybe"},
         "FEEDFLEET_PULSAR_TLS_VALIDATE_HOSTNAME must be true or false, got 'maybe'"),
    ],
)  # fmt: skip
def test_bad_settings_are_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        PulsarAccess.from_env(TLS_URL, env)
    assert str(exc.value) == message


def test_an_empty_token_file_and_a_ca_without_tls_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match=f"FEEDFLEET_PULSAR_TOKEN_FILE: {empty} is empty"):
        PulsarAccess.from_env(TLS_URL, {"FEEDFLEET_PULSAR_TOKEN_FILE": str(empty)})
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(SystemExit, match="is not pulsar\\+ssl://"):
        PulsarAccess.from_env("pulsar://broker:6650", {"FEEDFLEET_PULSAR_TLS_TRUST_CERTS": str(ca)})


def test_the_token_stays_out_of_reprs_and_log_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "pulsar.token"
    token_file.write_text(TOKEN)
    for name in ("FEEDFLEET_DATABASE_URL", "FEEDFLEET_REDIS_URL"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("FEEDFLEET_PULSAR_URL", TLS_URL)
    monkeypatch.setenv("FEEDFLEET_PULSAR_TOKEN_FILE", str(token_file))
    settings = Settings.from_env()
    assert settings.pulsar.token == TOKEN
    assert settings.pulsar.url == TLS_URL
    assert TOKEN not in repr(settings)
    # Read from a file, it is not in the environment: the log masks it all the same.
    event = _mask_secrets(None, "info", {"event": "x", "error": f"refused {TOKEN} here"})
    assert event["error"] == "refused *** here"


# ------------------------------------------------------------------ a real connection


@dataclass
class TlsRelay:
    """TLS in front of a plain broker: what a TLS-terminating Pulsar proxy does, minus the
    topic lookups (pulsar-lite answers those with its own plain address). Keeps the first
    bytes each client sent: its Connect command."""

    broker_port: int
    cert: Path
    key: Path
    port: int = field(default_factory=free_port)
    first_frames: list[bytes] = field(default_factory=list)

    def start(self) -> None:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", self.port, ssl=context)
        )
        ready.set()
        self._loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        first = await reader.read(65536)
        self.first_frames.append(first)
        broker_writer.write(first)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, broker_writer), pipe(broker_reader, writer))

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRelay]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test broker's certificate")
    work = tmp_path_factory.mktemp("pulsar-tls")
    cert, key = work / "cert.pem", work / "key.pem"
    # For the name "localhost" only: 127.0.0.1 is then a host name the certificate lacks.
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    port = free_port()
    broker = EmbeddedProcess(pulsar_command(port, work / "pulsar"), port, work / "pulsar.log")
    broker.start()
    tls = TlsRelay(port, cert, key)
    tls.start()
    try:
        yield tls
    finally:
        tls.stop()
        broker.stop()


def _partitions(access: PulsarAccess) -> list[str]:
    """A request the broker answers on the service URL's own connection (no lookup)."""
    client = new_pulsar_client(
        access, operation_timeout_seconds=3, connection_timeout_ms=3000,
        logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error),
    )  # fmt: skip
    try:
        return list(client.get_topic_partitions("persistent://public/default/tls-check"))
    finally:
        client.close()


def test_a_client_connects_over_tls_and_sends_the_token(relay: TlsRelay, tmp_path: Path) -> None:
    token_file = tmp_path / "pulsar.token"
    token_file.write_text(TOKEN)
    access = PulsarAccess.from_env(
        f"pulsar+ssl://localhost:{relay.port}",
        {"FEEDFLEET_PULSAR_TOKEN_FILE": str(token_file),
         "FEEDFLEET_PULSAR_TLS_TRUST_CERTS": str(relay.cert)},
    )  # fmt: skip
    before = len(relay.first_frames)
    assert _partitions(access) == ["persistent://public/default/tls-check"]
    connect = relay.first_frames[before]
    # The Connect command, decrypted by the relay: auth_method_name "token", auth_data.
    assert b"*\x05token" in connect
    assert TOKEN.encode() in connect


def test_a_wrong_ca_or_host_name_is_refused(relay: TlsRelay, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", other / "key.pem", "-out", other / "cert.pem", "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    wrong_ca = PulsarAccess(
        f"pulsar+ssl://localhost:{relay.port}", tls_trust_certs=other / "cert.pem"
    )
    with pytest.raises(pulsar.PulsarException):
        _partitions(wrong_ca)
    # The certificate names localhost, not 127.0.0.1: refused unless the check is off.
    by_address = PulsarAccess(f"pulsar+ssl://127.0.0.1:{relay.port}", tls_trust_certs=relay.cert)
    with pytest.raises(pulsar.PulsarException):
        _partitions(by_address)
    unchecked = PulsarAccess(
        by_address.url, tls_trust_certs=relay.cert, tls_validate_hostname=False
    )
    assert _partitions(unchecked) == ["persistent://public/default/tls-check"]
