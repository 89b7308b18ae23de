"""Where sfc finds its bundled data and keeps its export cache."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BUNDLED_DATA", "cache_dir"]


def _bundled_data() -> Path:
    """calibration_data/: inside the installed package where a wheel or `pip install .` put
    it (pyproject maps it to sfc/calibration_data), else beside compiler/ in the clone that
    an editable install runs from (resolve(): a strict editable install links the modules)."""
    package = Path(__file__).resolve().parent
    installed = package / "calibration_data"
    return installed if installed.is_dir() else package.parent / "calibration_data"


# The default calibration (calib/) and evaluation (eval/) sets and synth/texts.txt.
BUNDLED_DATA = _bundled_data()


def cache_dir() -> Path:
    """Folder for zoo exports made on demand: $SFC_CACHE, else ~/.cache/sfc."""
    return Path(os.environ.get("SFC_CACHE", Path.home() / ".cache" / "sfc"))
