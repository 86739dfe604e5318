"""autocomp: hardware-aware architecture search and compression under measured budgets.

The public API is imported lazily so that ``autocomp --help`` and budget parsing stay instant
(torch is only loaded by the stages that need it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AutocompError": "autocomp.errors",
    "Budget": "autocomp.budget",
    "search": "autocomp.api",
    "compress": "autocomp.api",
    "measure": "autocomp.api",
    "get_device": "autocomp.hardware",
    "DeviceInfo": "autocomp.hardware",
    "Measurement": "autocomp.hardware",
    "load_data": ("autocomp.data", "load"),
    "get_space": "autocomp.spaces",
    "load_predictor": "autocomp.latency",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'autocomp' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
