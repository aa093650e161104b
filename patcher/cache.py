"""The on-disk cache for fixtures and statistics."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """$PATCHER_CACHE, or ~/.cache/patcher."""
    return Path(os.environ.get("PATCHER_CACHE", Path.home() / ".cache" / "patcher"))
