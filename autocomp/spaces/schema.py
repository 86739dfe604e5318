"""Reading a search-space YAML file with errors that name the file, the key and the problem."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from autocomp.errors import AutocompError

BITS = (4, 8, 16, 32)
ACTS = ("relu", "hswish")


def read_yaml(path: Path) -> dict[str, Any]:
    """``yaml.safe_load`` a space file; unreadable, malformed or non-mapping files are refused."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise AutocompError(f"search space {path}: cannot read file ({err.strerror})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise AutocompError(f"search space {path}: invalid YAML{at}") from None
    if not isinstance(data, dict):
        raise AutocompError(f"search space {path}: expected a mapping at the top level")
    return data


class Schema:
    """Checks values of one file; every error reads ``search space FILE: key 'K': PROBLEM``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, problem: str) -> AutocompError:
        return AutocompError(f"search space {self.source}: key '{key}': {problem}")

    def mapping(
        self, value: Any, key: str, required: Iterable[str], optional: Iterable[str] = ()
    ) -> dict[str, Any]:
        """A mapping with exactly the given required keys and some of the optional ones."""
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, got {type(value).__name__}")
        required, allowed = list(required), [*required, *optional]
        prefix = f"{key}." if key else ""
        for k in value:
            if k not in allowed:
                raise self.error(f"{prefix}{k}", f"unknown key (allowed: {', '.join(allowed)})")
        for k in required:
            if k not in value:
                raise self.error(f"{prefix}{k}", "missing")
        return value

    def number(
        self,
        value: Any,
        key: str,
        kind: type = int,
        low: float | None = None,
        high: float | None = None,
        allowed: Iterable[Any] | None = None,
    ) -> Any:
        """An int (or float, when ``kind`` is float) inside [low, high] or among ``allowed``."""
        ok = isinstance(value, int | float) if kind is float else isinstance(value, int)
        if isinstance(value, bool) or not ok:
            raise self.error(key, f"expected {kind.__name__}, got {value!r}")
        allowed = tuple(allowed) if allowed is not None else None
        if allowed is not None and value not in allowed:
            raise self.error(key, f"{value!r} is not one of {list(allowed)}")
        if low is not None and value < low:
            raise self.error(key, f"{value!r} is below the minimum {low}")
        if high is not None and value > high:
            raise self.error(key, f"{value!r} is above the maximum {high}")
        return kind(value)

    def choices(self, value: Any, key: str, kind: type = int, **bounds: Any) -> tuple[Any, ...]:
        """A non-empty list of distinct numbers, returned sorted ascending."""
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of choices, got {value!r}")
        if not value:
            raise self.error(key, "empty choice list")
        items = [self.number(v, f"{key}[{i}]", kind, **bounds) for i, v in enumerate(value)]
        if len(set(items)) != len(items):
            raise self.error(key, f"duplicate choices in {value}")
        return tuple(sorted(items))

    def flag(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def word(self, value: Any, key: str, allowed: Iterable[str]) -> str:
        allowed = tuple(allowed)
        if value not in allowed:
            raise self.error(key, f"{value!r} is not one of {list(allowed)}")
        return value

    def stages(self, value: Any, key: str = "stages") -> list[Any]:
        if not isinstance(value, list) or not value:
            raise self.error(key, "expected a non-empty list of stages")
        return value
