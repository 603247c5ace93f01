"""compressflow's cache on this machine: ``$COMPRESSFLOW_CACHE`` (default
``~/.cache/compressflow``), one folder a kind of thing kept (``stores``, ``gguf``)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "COMPRESSFLOW_CACHE"


def cache_folder(kind: str) -> Path:
    """The cache's folder for ``kind`` (not created here)."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "compressflow"
    return Path(base).expanduser() / kind
