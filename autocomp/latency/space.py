"""Arch-level latency of one search space on one device, fitted from on-device measurements.

The search asks for the latency of thousands of candidates, so it needs a vectorised predictor over
``space.encode`` vectors (:class:`~autocomp.latency.predictors.ArchPredictor`). It is fitted on
real measurements of sampled candidates (the smallest, the largest and random ones, each exported
with its per-layer bits), which are cached per device profile and space so later runs reuse them.
Verification measurements correct it: a candidate measured slower than predicted raises a
multiplicative safety factor, so the next choice is made with the truth in hand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from autocomp.hardware.base import Device
from autocomp.latency.dataset import append_record, read_records
from autocomp.latency.metrics import latency_metrics
from autocomp.latency.predictors import ArchPredictor
from autocomp.latency.store import cache_dir

#: ``to_onnx(candidate) -> (serialized ONNX, input shape)``: how a candidate is deployed.
ToOnnx = Callable[[Any], tuple[bytes, tuple[int, ...]]]


class SpaceLatency:
    """Latency predictor for ``space`` on ``device``; see the module docstring."""

    def __init__(self, space: Any, device: Device, to_onnx: ToOnnx, cache: Path) -> None:
        self.space = space
        self.device = device
        self.to_onnx = to_onnx
        self.cache = cache
        self.scale_ = 1.0
        self.records_: list[dict[str, Any]] = []
        self.predictor_: ArchPredictor | None = None
        self.holdout_: dict[str, float] = {}

    @classmethod
    def fit(
        cls,
        space: Any,
        device: Device,
        to_onnx: ToOnnx,
        n_samples: int,
        *,
        seed: int = 0,
        cache: Path | None = None,
        progress: bool = True,
    ) -> SpaceLatency:
        """Measure ``n_samples`` candidates (besides the extremes) unless cached, then fit."""
        cache = cache or default_cache(space, device)
        model = cls(space, device, to_onnx, cache)
        rng = np.random.default_rng(seed)
        wanted = [space.smallest(), space.largest()]
        wanted += [space.sample(rng) for _ in range(n_samples)]
        cache.parent.mkdir(parents=True, exist_ok=True)
        model.records_ = read_records(cache) if cache.is_file() else []
        have = {r["id"] for r in model.records_}
        todo = [c for c in _unique(wanted) if c.key() not in have]
        from tqdm.auto import tqdm

        for candidate in tqdm(todo, desc="latency model", unit="net", disable=not progress):
            record = {
                "id": candidate.key(),
                "candidate": candidate.to_dict(),
                "median_ms": model.measure(candidate),
            }
            append_record(cache, record)
            model.records_.append(record)
        model._refit(seed)
        return model

    def measure(self, candidate: Any) -> float:
        """Median latency of the candidate, exported as deployed, measured on the device."""
        data, shape = self.to_onnx(candidate)
        return float(self.device.measure(data, shape).median_ms)

    def predict(self, candidates: Sequence[Any]) -> np.ndarray:
        """Predicted milliseconds, safety factor included."""
        assert self.predictor_ is not None, "fit first"
        return self.scale_ * self.predictor_.predict(self.space.encode(list(candidates)))

    def correct(self, candidate: Any, measured_ms: float) -> None:
        """Learn from a verification measurement: keep it, refit, and never under-predict it."""
        record = {"id": candidate.key(), "candidate": candidate.to_dict(), "median_ms": measured_ms}
        append_record(self.cache, record)
        self.records_ = [r for r in self.records_ if r["id"] != record["id"]] + [record]
        self._refit(0)
        predicted = float(self.predict([candidate])[0])
        if measured_ms > predicted:
            self.scale_ *= measured_ms / predicted

    def summary(self) -> dict[str, Any]:
        return {
            "samples": len(self.records_),
            "cache": str(self.cache),
            "scale": self.scale_,
            "holdout": self.holdout_,
        }

    def _refit(self, seed: int) -> None:
        from autocomp.spaces.candidate import Candidate

        candidates = [Candidate.from_dict(r["candidate"]) for r in self.records_]
        X = self.space.encode(candidates)
        y = np.array([r["median_ms"] for r in self.records_], dtype=float)
        # Held-out accuracy, reported in the run's report: fit on 80 %, score the rest.
        order = np.random.default_rng(seed).permutation(len(y))
        cut = max(1, int(0.8 * len(y)))
        if len(y) >= 10:
            probe = ArchPredictor(random_state=seed).fit(X[order[:cut]], y[order[:cut]])
            self.holdout_ = latency_metrics(y[order[cut:]], probe.predict(X[order[cut:]]))
        self.predictor_ = ArchPredictor(random_state=seed).fit(X, y)


def default_cache(space: Any, device: Device) -> Path:
    """``<cache>/<profile>/space-<name>-<hash of the space definition>.jsonl``."""
    source = Path(space.source)
    if not source.is_file():  # a built-in space: its YAML is package data
        source = Path(str(resources.files("autocomp.builtin_spaces").joinpath(space.source)))
    digest = hashlib.sha1(source.read_bytes()).hexdigest()[:12]
    return cache_dir() / device.info.profile / f"space-{space.name}-{digest}.jsonl"


def _unique(candidates: Sequence[Any]) -> list[Any]:
    seen: dict[str, Any] = {}
    for c in candidates:
        seen.setdefault(c.key(), c)
    return list(seen.values())
