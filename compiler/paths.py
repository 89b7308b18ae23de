"""Where sfc finds its bundled data and keeps its export cache."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BUNDLED_DATA", "cache_dir"]

# The repository's calibration_data/ (sfc is installed from a clone, editable).
BUNDLED_DATA = Path(__file__).resolve().parents[1] / "calibration_data"


def cache_dir() -> Path:
    """Folder for zoo exports made on demand: $SFC_CACHE, else ~/.cache/sfc."""
    return Path(os.environ.get("SFC_CACHE", Path.home() / ".cache" / "sfc"))
