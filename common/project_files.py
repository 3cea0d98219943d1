"""Where the files the fleet needs beside its code are: ``schema.sql`` and
``supervisord.conf``.

In a checkout (``make setup``'s editable install) they sit at its root, above the
packages. ``pip install .`` (no checkout on the host) puts them under
``<prefix>/share/feedfleet/`` (pyproject's ``data-files``), where ``<prefix>`` is the
virtualenv's. The checkout's copy wins where both exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
INSTALLED = Path(sys.prefix) / "share" / "feedfleet"


def project_file(name: str) -> Path:
    """The checkout's ``name``, else the installed copy's (which may be missing too: the
    caller's open then names the checkout's path, where a developer looks first)."""
    checkout = CHECKOUT / name
    if checkout.exists():
        return checkout
    installed = INSTALLED / name
    return installed if installed.exists() else checkout
