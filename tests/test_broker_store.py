"""The embedded broker's store under its cap: emptied before start when over it, and while
running the real broker under a real supervisord is restarted on an empty store and
takes messages again."""

from __future__ import annotations

import getpass
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pulsar
import pytest

from common.embedded import free_port, pulsar_command, wait_for_port
from common.pulsar_client import new_pulsar_client
from workers.broker_store import BrokerStoreCap, max_bytes_from_env, store_bytes


def test_before_start_empties_the_store_only_over_the_cap(tmp_path: Path) -> None:
    # As pulsar-lite --db-path DIR lays it out: beside DIR, not in it.
    store = tmp_path / "pulsar"
    store.mkdir()
    (tmp_path / "pulsar.rocksdb" / "entrylog").mkdir(parents=True)
    (tmp_path / "pulsar.rocksdb" / "entrylog" / "0.log").write_bytes(b"x" * 5000)
    (tmp_path / "pulsar.rocksdb" / "CURRENT").write_bytes(b"y" * 90)
    (tmp_path / "pulsar.metadata.json").write_bytes(b"{}" * 5)
    (tmp_path / "pulsar-lite.toml").write_bytes(b"[metrics]\n")  # its config: not the store
    assert store_bytes(store) == 5100
    assert BrokerStoreCap(store, 5100, tmp_path).before_start() == 0
    assert store_bytes(store) == 5100
    assert BrokerStoreCap(store, 5099, tmp_path).before_start() == 5100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pulsar", "pulsar-lite.toml"]
    assert store.is_dir() and list(store.iterdir()) == []
    assert store_bytes(tmp_path / "absent") == 0


def test_the_cap_from_the_environment() -> None:
    assert max_bytes_from_env({}) == 4 * 1024**3
    assert max_bytes_from_env({"FEEDFLEET_BROKER_MAX_BYTES": "0"}) == 0
    with pytest.raises(SystemExit, match="FEEDFLEET_BROKER_MAX_BYTES must be a whole number"):
        max_bytes_from_env({"FEEDFLEET_BROKER_MAX_BYTES": "4G"})


@pytest.fixture
def supervised_broker(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """pulsar-lite as the program ``broker`` of a supervisord under ``tmp_path``."""
    var = tmp_path
    port = free_port()
    command = " ".join(pulsar_command(port, var / "pulsar"))
    conf = var / "supervisord.conf"
    conf.write_text(
        f"[unix_http_server]\nfile={var}/supervisor.sock\nchmod=0700\n"
        f"[supervisord]\nlogfile={var}/supervisord.log\npidfile={var}/supervisord.pid\n"
        f"user={getpass.getuser()}\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
        f"[program:broker]\ncommand={command}\nstartsecs=0\n"
        f"stdout_logfile={var}/broker.log\nredirect_stderr=true\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, timeout=30)
        yield var, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _send(port: int, topic: str, count: int) -> None:
    client = new_pulsar_client(f"pulsar://127.0.0.1:{port}", operation_timeout_seconds=10)
    try:
        producer = client.create_producer(topic)
        for _ in range(count):
            producer.send(b"m" * 2000)
        producer.close()
    finally:
        client.close()


def test_over_the_cap_the_broker_restarts_on_an_empty_store(
    supervised_broker: tuple[Path, int],
) -> None:
    var, port = supervised_broker
    store = var / "pulsar"
    _send(port, "persistent://public/default/store-cap", 200)
    filled = store_bytes(store)
    assert filled > 200 * 2000
    assert BrokerStoreCap(store, filled, var).check() == 0  # at the cap: left alone
    assert store_bytes(store) >= filled

    assert BrokerStoreCap(store, 100_000, var).check() == filled

    wait_for_port(port, timeout=30)
    assert store_bytes(store) < 100_000  # what the restarted broker made of an empty store
    deadline = time.monotonic() + 30
    while True:  # the broker takes messages again
        try:
            _send(port, "persistent://public/default/store-cap", 10)
            break
        except pulsar.PulsarException:
            assert time.monotonic() < deadline, "the restarted broker took no message"
            time.sleep(0.5)
    assert store_bytes(store) < filled
