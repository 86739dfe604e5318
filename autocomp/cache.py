"""Where autocomp keeps what it learns about this machine (adapted predictors, calibrations)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$AUTOCOMP_CACHE`` or ``~/.cache/autocomp``."""
    return Path(os.environ.get("AUTOCOMP_CACHE") or Path.home() / ".cache" / "autocomp")
