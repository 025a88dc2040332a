"""A third-party sink, installed the way pip installs a package: README's example (``site/
rotator_json_sink.py``) next to its ``.dist-info`` (metadata, and the ``rotator.sinks`` entry point that
registers it). Putting ``site`` on the import path (``sys.path`` in-process, ``PYTHONPATH`` for a
``rotator`` process) is all an installation does that rotator can see, so nothing is built or downloaded.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rotator import registry

SITE = Path(__file__).resolve().parent / "site"
MODULE = "rotator_json_sink"
TYPE_NAME = "json_file"


@contextmanager
def installed() -> Iterator[None]:
    """The example package importable and its entry point seen by the registry; both gone afterwards."""
    sys.path.insert(0, str(SITE))
    importlib.invalidate_caches()
    registry.sinks.cache_clear()
    try:
        yield
    finally:
        sys.path.remove(str(SITE))
        sys.modules.pop(MODULE, None)
        registry.sinks.cache_clear()
