"""`feedfleet ctl [--var DIR] ARGS...`: supervisorctl against this fleet's supervisord.

supervisord makes its socket under the fleet's state directory (``feedfleet run --var
DIR``, ``FEEDFLEET_VAR``, else ``./var`` of the checkout), and only its owner may use it
(``chmod=0700`` in supervisord.conf). A bare ``supervisorctl`` knows neither where that
is nor lives on the PATH, so this finds the socket the same way ``feedfleet run`` chose it
and runs the venv's supervisorctl against it with ARGS as given (``status``,
``stop worker:polygon``, ``tail -f worker:polygon``; none: its shell). The exit status is
supervisorctl's; 2 when there is no socket to talk to.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from common.project_files import project_file

ROOT = Path(__file__).resolve().parents[1]
SOCKET_NAME = "supervisor.sock"
USAGE = "usage: feedfleet ctl [--var DIR] SUPERVISORCTL-ARGS..."


def split_args(argv: Sequence[str], environ: dict[str, str]) -> tuple[Path, list[str]]:
    """The state directory (``--var DIR`` or ``--var=DIR`` first, else ``FEEDFLEET_VAR``,
    else ./var of the checkout) and the arguments left for supervisorctl, untouched."""
    args = list(argv)
    var: str | None = None
    if args[:1] == ["--var"]:
        if len(args) < 2:
            raise ValueError("--var needs a directory")
        var, args = args[1], args[2:]
    elif args and args[0].startswith("--var="):
        var, args = args[0].split("=", 1)[1], args[1:]
    var = var or environ.get("FEEDFLEET_VAR") or str(ROOT / "var")
    return Path(var).resolve(), args


def supervisorctl_command(var: Path, args: Sequence[str]) -> list[str]:
    """supervisorctl from this interpreter's environment, on ``var``'s socket."""
    return [
        sys.executable, "-m", "supervisor.supervisorctl",
        "-c", str(project_file("supervisord.conf")),
        "-s", f"unix://{var / SOCKET_NAME}", *args,
    ]  # fmt: skip


def main(argv: Sequence[str]) -> int:
    try:
        var, args = split_args(argv, dict(os.environ))
    except ValueError as exc:
        print(f"feedfleet ctl: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    if args[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n(no ARGS: supervisorctl's own shell)", file=sys.stderr)
        return 0
    socket_path = var / SOCKET_NAME
    if not socket_path.exists():
        print(
            f"feedfleet ctl: no fleet is running under {var} (no {socket_path}); start one "
            "with `make run`, or name its state directory with --var DIR or FEEDFLEET_VAR",
            file=sys.stderr,
        )
        return 2
    return subprocess.run(supervisorctl_command(var, args), check=False).returncode
