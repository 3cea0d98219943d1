"""A worker whose provider row does not exist yet waits for it, and still stops at once.

A host deployed before its provider rows ran workers that ignored SIGTERM while waiting
(supervisord SIGKILLed each after its stop timeout): the wait now ends on a stop too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import Services

ROOT = Path(__file__).resolve().parents[1]


def test_a_worker_waiting_for_its_provider_row_stops_at_sigterm(
    services: Services, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDFLEET_")}
    env.update(
        FEEDFLEET_DATABASE_URL=services.database_url, FEEDFLEET_REDIS_URL=services.redis_url,
        FEEDFLEET_PULSAR_URL=services.pulsar_url, FEEDFLEET_JOURNAL_DIR=str(tmp_path / "j"),
        FEEDFLEET_LOG_FORMAT="json", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", "no-such-provider"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while b"provider_not_found" not in log_path.read_bytes():
            assert worker.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the worker never looked for its row"
            time.sleep(0.1)
        worker.send_signal(signal.SIGTERM)
        # Its wait between looks is up to 10 s (backoff); a stop must not wait for it.
        assert worker.wait(timeout=5) == 0, log_path.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
