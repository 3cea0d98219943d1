"""``python -m simulators NAME [options]``: run one provider simulator."""

from __future__ import annotations

import importlib
import sys

SIMULATORS = ("polygon", "refinitiv", "alphavantage", "iex", "fix", "bloomberg")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SIMULATORS:
        print(f"usage: python -m simulators {{{','.join(SIMULATORS)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(f"simulators.{sys.argv[1]}")
    module.main(sys.argv[2:])


if __name__ == "__main__":
    main()
