"""`feedfleet ctl`: which fleet's socket it talks to, and a clear answer when none runs.
Against a real supervisord: tests/test_e2e_fleet.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from workers.ctl import ROOT, split_args, supervisorctl_command


def test_var_comes_from_the_option_then_the_environment_then_the_checkout(
    tmp_path: Path,
) -> None:
    env = {"FEEDFLEET_VAR": str(tmp_path / "from-env")}
    assert split_args(["--var", str(tmp_path / "a"), "tail", "-f", "worker:polygon"], env) == (
        tmp_path / "a",
        ["tail", "-f", "worker:polygon"],
    )
    assert split_args([f"--var={tmp_path / 'b'}", "status"], env) == (tmp_path / "b", ["status"])
    assert split_args(["status"], env) == (tmp_path / "from-env", ["status"])
    assert split_args(["status"], {}) == (ROOT / "var", ["status"])
    # supervisorctl's own options pass through untouched.
    assert split_args(["status", "--var"], {})[1] == ["status", "--var"]


def test_the_command_names_the_socket_under_var(tmp_path: Path) -> None:
    cmd = supervisorctl_command(tmp_path, ["stop", "worker:polygon"])
    assert cmd[-4:] == ["-s", f"unix://{tmp_path}/supervisor.sock", "stop", "worker:polygon"]
    assert cmd[:3] == [sys.executable, "-m", "supervisor.supervisorctl"]


def test_no_running_fleet_is_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDFLEET_")}
    out = subprocess.run(
        [sys.executable, "-m", "workers.cli", "ctl", "--var", str(tmp_path), "status"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert f"no fleet is running under {tmp_path}" in out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "workers.cli", "ctl", "--var"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "--var needs a directory" in bad.stderr
