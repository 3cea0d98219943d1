"""The embedded broker's store under a size cap, for `feedfleet run`.

pulsar-lite 0.2.0, the embedded broker, keeps every message it is sent: its config file
takes the listen address, connection and publish-rate limits and metrics, nothing on
retention, TTL or backlog quotas (unknown keys are ignored without a word), and it never
deletes its entry-log files (a soak at 8,450 events/s grew the store by 16.3 GB an
hour). So the fleet bounds the one thing the broker lets it, the store itself:

- at start, before the broker runs, a store over the cap is emptied;
- while the fleet runs, every ``CHECK_INTERVAL_S``, a store over the cap gets the broker
  stopped, its store emptied and the broker started again (supervisorctl).

The workers lose nothing by it: their journals keep every event the broker has not
acknowledged and send it again once the broker is back, as after any broker outage. What
goes is what consumers had not read from the old store, as with a real namespace's
retention and backlog quota (README, Storage, for a real Pulsar).
``FEEDFLEET_BROKER_MAX_BYTES`` sets the cap (default 4 GiB; 0: none).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from workers.ctl import supervisorctl_command

DEFAULT_MAX_BYTES = 4 * 1024**3
# pulsar-lite --db-path DIR writes beside DIR, not in it: DIR.rocksdb (the entry logs and
# their index) and DIR.metadata.json (topics, subscriptions).
STORE_SUFFIXES = ("", ".rocksdb", ".metadata.json")
CHECK_INTERVAL_S = 60.0
PROGRAM = "broker"  # its [program:] name in supervisord.conf


def max_bytes_from_env(env: dict[str, str]) -> int:
    value = env.get("FEEDFLEET_BROKER_MAX_BYTES") or str(DEFAULT_MAX_BYTES)
    if not value.isdigit():
        raise SystemExit(f"FEEDFLEET_BROKER_MAX_BYTES must be a whole number, got {value!r}")
    return int(value)


def store_paths(db_path: Path) -> list[Path]:
    """What the broker started with ``--db-path db_path`` keeps."""
    return [db_path.with_name(db_path.name + suffix) for suffix in STORE_SUFFIXES]


def store_bytes(db_path: Path) -> int:
    """Bytes in the broker's store for ``db_path`` (0 when there is none)."""
    total = 0
    for path in store_paths(db_path):
        # The broker may remove a file meanwhile (RocksDB compaction).
        with contextlib.suppress(FileNotFoundError):
            if path.is_file():
                total += path.stat().st_size
        for directory, _, files in os.walk(path):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(directory, name)).st_size
    return total


def empty_store(db_path: Path) -> None:
    """Remove the store; ``db_path`` is left as an empty directory, as at first start."""
    for path in store_paths(db_path):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    db_path.mkdir(parents=True, exist_ok=True)


@dataclass
class BrokerStoreCap:
    """The store of the broker started with ``--db-path store`` kept under ``max_bytes``,
    for the fleet whose supervisord runs under ``var``."""

    store: Path
    max_bytes: int
    var: Path

    def before_start(self) -> int:
        """Empty the store when it is over the cap; the bytes removed (0: none)."""
        size = store_bytes(self.store)
        if size <= self.max_bytes:
            return 0
        empty_store(self.store)
        self._say(f"emptied the broker's store ({size:,} bytes, cap {self.max_bytes:,})")
        return size

    def check(self) -> int:
        """While the fleet runs: over the cap, restart the broker on an empty store.
        Returns the bytes removed (0: under the cap, or the broker would not stop)."""
        size = store_bytes(self.store)
        if size <= self.max_bytes:
            return 0
        if not self._ctl("stop"):
            return 0
        empty_store(self.store)
        self._ctl("start")
        self._say(
            f"restarted the broker on an empty store ({size:,} bytes, cap "
            f"{self.max_bytes:,}); the workers resend what it had not acknowledged"
        )
        return size

    def _ctl(self, action: str) -> bool:
        done = subprocess.run(
            supervisorctl_command(self.var, [action, PROGRAM]),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            self._say(f"supervisorctl {action} {PROGRAM} failed: {done.stdout.strip()}")
        return done.returncode == 0

    @staticmethod
    def _say(message: str) -> None:
        print(f"feedfleet: {message}", file=sys.stderr)
