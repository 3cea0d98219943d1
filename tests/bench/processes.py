"""The processes a step starts and stops: a simulator, a worker, a replay source.

Each is a child of the bench, run from the repository root with the bench's Python. They
inherit the bench's CPU affinity (the shared core when it is pinned); the worker is then
moved onto its own core by the caller (``Pinning.pin_worker``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from common.embedded import wait_for_port
from common.stage_cpu import ENV as STAGE_CPU_ENV

ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "FEEDFLEET_BENCH_POLYGON_KEY"
WORKER_HOST = "bench"


def start_source(cmd: list[str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """``cmd`` with its output to ``log_path``, once it listens on ``port``."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=20)
    except TimeoutError:
        stop(proc, 5)
        raise
    return proc


def start_simulator(
    port: int, rate: int, symbols: int, events_per_frame: int | None, log_path: Path
) -> subprocess.Popen[bytes]:
    """The Polygon simulator at ``rate`` (0: unpaced), its trades stamped with their send
    time; ``events_per_frame`` None leaves its own default frame size."""
    cmd = [
        sys.executable, "-m", "simulators", "polygon", "--port", str(port),
        "--rate", str(rate), "--num-symbols", str(symbols), "--stamp-send-time",
    ]  # fmt: skip
    if events_per_frame is not None:
        cmd += ["--batch", str(events_per_frame)]
    return start_source(cmd, port, log_path)


def start_replay_source(
    port: int, symbols: int, events_per_frame: int, log_path: Path
) -> subprocess.Popen[bytes]:
    """Pre-encoded simulator frames, sent as fast as the socket takes them."""
    cmd = [
        sys.executable, "-m", "tests.bench.replay_server", "--port", str(port),
        "--symbols", str(symbols), "--events-per-frame", str(events_per_frame),
    ]  # fmt: skip
    return start_source(cmd, port, log_path)


def start_worker(
    provider_name: str, env_overrides: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """``python -m workers <provider_name>`` with the bench's services in its environment."""
    env = dict(os.environ)
    env.pop(STAGE_CPU_ENV, None)  # stage timing only where a step asks for it
    env.update({"FEEDFLEET_HOST": WORKER_HOST, KEY_ENV: "bench-key"})
    env.update(env_overrides)
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers", provider_name],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
