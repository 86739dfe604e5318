"""One point of a joint search space, and its cost."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from autocomp.errors import AutocompError


def _frozen(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in sorted(d)}


def _number(value: Any) -> int | float:
    """An int stays an int (depth 3), anything else numeric becomes a float (ratio 0.5)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return value if isinstance(value, int) else float(value)


@dataclass(frozen=True, eq=False)
class Candidate:
    """Architecture choices + per-layer width keep-ratios + per-layer bitwidths.

    ``arch`` maps choice names (``"depth.2"``, ``"kernel.2.0"``, ``"expand.2.0"``, ``"width.2"``)
    to values; ``widths`` maps a prunable layer's name (its module path in the network, e.g.
    ``"stages.2.0.expand"``) to the fraction of its output channels kept; ``bits`` maps every
    quantizable conv/linear layer's name to 8 or 32. Only the layers of blocks inside the active
    depth appear, so two candidates describing the same network are equal and hash alike.
    """

    space: str
    resolution: int
    arch: dict[str, int | float] = field(default_factory=dict)
    widths: dict[str, float] = field(default_factory=dict)
    bits: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "resolution": self.resolution,
            "arch": _frozen(self.arch),
            "widths": _frozen(self.widths),
            "bits": _frozen(self.bits),
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace; the basis of ``key()`` and equality."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        try:
            return cls(
                space=str(data["space"]),
                resolution=int(data["resolution"]),
                arch={str(k): _number(v) for k, v in data.get("arch", {}).items()},
                widths={str(k): float(v) for k, v in data.get("widths", {}).items()},
                bits={str(k): int(v) for k, v in data.get("bits", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise AutocompError(f"not a valid candidate: {type(err).__name__}: {err}") from None

    @classmethod
    def from_json(cls, text: str) -> Candidate:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise AutocompError(f"not a valid candidate: invalid JSON ({err})") from None
        if not isinstance(data, dict):
            raise AutocompError("not a valid candidate: expected a JSON object")
        return cls.from_dict(data)

    def within(self, other: Candidate) -> bool:
        """Whether this network is a subnet of ``other`` at no more bits: same space, and every
        choice (resolution, depths, kernels, expansions, widths, keep ratios, bits) at most
        ``other``'s for the same block or layer, whose blocks include all of this one's. Every
        choice of a space is ordinal, a larger value holding more; a supernet's weights for
        this network are part of ``other``'s."""
        if self.space != other.space or self.resolution > other.resolution:
            return False
        return all(
            all(name in theirs and value <= theirs[name] for name, value in mine.items())
            for mine, theirs in (
                (self.arch, other.arch),
                (self.widths, other.widths),
                (self.bits, other.bits),
            )
        )

    def key(self) -> str:
        """Stable identifier: sha1 of the canonical JSON (same across processes and runs)."""
        return hashlib.sha1(self.to_json().encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Candidate) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())


@dataclass(frozen=True)
class Cost:
    """Exact cost of a candidate at batch size 1 (or the given input shape).

    ``macs`` counts multiply-accumulates of convolutions and matrix products only — what
    ``torch.utils.flop_counter.FlopCounterMode`` counts as FLOPs / 2 (BatchNorm, activations,
    pooling, residual adds and the SE product are not counted). ``flops = 2 * macs``.
    ``params`` is ``sum(p.numel())`` of the built model; ``size_bytes`` is the exported ONNX file.
    """

    macs: int
    params: int
    size_bytes: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> dict[str, int]:
        return {
            "macs": self.macs,
            "flops": self.flops,
            "params": self.params,
            "size_bytes": self.size_bytes,
        }
