"""``python -m tests.bench [options]`` (``make bench``): see ``tests.bench.runner``."""

import sys

from tests.bench.runner import main

raise SystemExit(main(sys.argv[1:]))
