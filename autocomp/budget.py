"""Budgets: what a returned model must provably meet.

Conventions (stated once, used everywhere): ``flops`` counts FLOPs = 2·MACs, so a budget written in
MACs is stored doubled; sizes are bytes of the exported model with SI prefixes (1 KB = 1000 B,
1 MB = 10^6 B) and binary ones where asked (1 KiB = 1024 B); params are plain counts.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

from autocomp.errors import AutocompError

ACCEPTED_FORMS = (
    "latency '5ms', '500us', '0.005s'; compute '300MFLOPs', '150M MACs'; "
    "params '1.5M params'; size '2MB', '512KB', '1MiB'; combine with commas: '5ms,2MB'"
)

_SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_NUMBER = r"(?P<num>\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)"
_TERM = re.compile(_NUMBER + r"\s*(?P<prefix>[kmgt]?)\s*(?P<unit>[a-zµ]*)", re.IGNORECASE)
_LATENCY_MS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1e3}
_SIZE_BYTES = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


@dataclass(frozen=True)
class Budget:
    """Upper bounds a model must meet; ``None`` means unconstrained.

    ``flops`` is FLOPs (= 2·MACs), ``size_bytes`` bytes of the exported ONNX model.
    """

    latency_ms: float | None = None
    flops: float | None = None
    params: float | None = None
    size_bytes: float | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``"5ms"``, ``"300MFLOPs"``, ``"150M MACs"``, ``"1.5M params"``, ``"2MB"``, or a
        comma-separated combination such as ``"5ms,2MB"``."""
        if not isinstance(text, str) or not text.strip():
            raise AutocompError(f"empty budget; accepted forms: {ACCEPTED_FORMS}")
        terms: dict[str, float] = {}
        for raw in text.split(","):
            name, value = _parse_term(raw.strip(), text)
            if name in terms:
                raise AutocompError(f"budget {text!r} gives {name} twice; give each term once")
            terms[name] = value
        return cls(**terms)

    @property
    def macs(self) -> float | None:
        return None if self.flops is None else self.flops / 2

    def terms(self) -> dict[str, float]:
        """The constrained terms only, e.g. ``{"latency_ms": 5.0}``."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def violations(self, **costs: float | None) -> dict[str, tuple[float, float]]:
        """Terms whose cost exceeds the limit: ``{term: (cost, limit)}``.

        A constrained term whose cost is missing is an error, never a silent pass.
        """
        known = {f.name for f in fields(self)}
        unknown = set(costs) - known
        if unknown:
            raise TypeError(f"unknown budget terms: {sorted(unknown)}")
        out = {}
        for term, limit in self.terms().items():
            cost = costs.get(term)
            if cost is None:
                raise ValueError(f"budget constrains {term} but no {term} cost was given")
            if cost > limit:
                out[term] = (float(cost), limit)
        return out

    def is_met(self, **costs: float | None) -> bool:
        return not self.violations(**costs)

    def __str__(self) -> str:
        parts = []
        if self.latency_ms is not None:
            parts.append(f"{self.latency_ms:g}ms")
        if self.flops is not None:
            parts.append(f"{self.flops / 1e6:g}MFLOPs")
        if self.params is not None:
            parts.append(f"{self.params / 1e6:g}M params")
        if self.size_bytes is not None:
            parts.append(f"{self.size_bytes / 1e6:g}MB")
        return ",".join(parts) or "unconstrained"


def _parse_term(term: str, whole: str) -> tuple[str, float]:
    match = _TERM.fullmatch(term)
    if not term or match is None:
        raise AutocompError(
            f"cannot parse budget term {term!r} in {whole!r}; accepted forms: {ACCEPTED_FORMS}"
        )
    number = float(match["num"])
    prefix, unit = match["prefix"], match["unit"]
    unit_l = unit.lower()
    # "5ms" reads as prefix 'm' + unit 's' and "2MB" as 'M' + 'B': resolve whole-unit words first.
    whole_unit = (prefix + unit).lower()
    if whole_unit in _LATENCY_MS:
        name, value = "latency_ms", number * _LATENCY_MS[whole_unit]
    elif whole_unit in _SIZE_BYTES:
        name, value = "size_bytes", number * _SIZE_BYTES[whole_unit]
    elif unit_l in ("flops", "flop"):
        name, value = "flops", number * _SI[prefix.lower()]
    elif unit_l in ("macs", "mac"):
        name, value = "flops", 2 * number * _SI[prefix.lower()]
    elif unit_l in ("params", "param", "p"):
        name, value = "params", number * _SI[prefix.lower()]
    else:
        raise AutocompError(
            f"unknown unit in budget term {term!r}; accepted forms: {ACCEPTED_FORMS}"
        )
    if not math.isfinite(value) or value <= 0:
        raise AutocompError(f"budget term {term!r} must be a positive finite number")
    return name, value
