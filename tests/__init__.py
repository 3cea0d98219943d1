import os
from pathlib import Path

# The provider samples beside the checkout (../shared). FEEDFLEET_SHARED_DIR points there
# when the tests run from a copy of the tree (mutation testing runs them from mutants/).
SHARED = Path(
    os.environ.get("FEEDFLEET_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared"
)
