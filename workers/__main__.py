"""``python -m workers NAME``: run the worker for the provider row named NAME."""

from __future__ import annotations

import sys

from workers.cli import main

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print("usage: python -m workers PROVIDER_NAME", file=sys.stderr)
        raise SystemExit(2)
    main(["worker", sys.argv[1]])
