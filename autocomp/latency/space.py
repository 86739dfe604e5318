"""Arch-level latency of one search space on one device, fitted from on-device measurements.

The search asks for the latency of many candidates, so it needs a fast predictor fitted from few
measurements. Latency on a CPU is close to a sum over layers, so the predictor is a non-negative
per-layer cost model over each candidate's exact plan (:func:`structure`: MACs, activation traffic
and count of each op class at each precision), fitted for relative error; with enough samples,
boosted trees over ``space.encode`` (:class:`~autocomp.latency.predictors.ArchPredictor`) learn
what the sum misses. Unlike trees alone, the additive model extrapolates to candidates larger or
smaller than those measured, which is where budgets bind. It is fitted on real measurements of
sampled candidates (the smallest, the largest and random ones, each exported with its per-layer
bits, each the fastest of :data:`PASSES` medians taken in separate passes), which are cached per
device profile and space so later runs reuse them.
Its error is measured too (:attr:`SpaceLatency.slack_`, by cross-validation), because the
search only screens with it: candidates predicted up to that much over a latency budget are still
evaluated, and the device decides among the most accurate (``autocomp.api``). A candidate it has
measured is predicted as measured, and the pipeline adds the measurements it takes on the way
(search seeds, the shortlist). Verification measurements correct it: a candidate measured slower
than predicted raises a multiplicative safety factor for every other, so the next choice is made
with the truth in hand.
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
from autocomp.latency.metrics import latency_metrics, out_of_fold
from autocomp.latency.predictors import ArchPredictor, fit_nonnegative
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
        self.coef_: np.ndarray | None = None
        self.predictor_: ArchPredictor | None = None
        self.holdout_: dict[str, float] = {}
        self.slack_ = 0.0

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

        bar = tqdm(
            total=len(todo) * (PASSES + 1), desc="latency model", unit="step", disable=not progress
        )
        exported = []
        for candidate in todo:
            exported.append(to_onnx(candidate))
            bar.update()
        fastest = [np.inf] * len(todo)
        for _ in range(PASSES):
            for i, (data, shape) in enumerate(exported):
                fastest[i] = min(fastest[i], float(device.measure(data, shape).median_ms))
                bar.update()
        for candidate, ms in zip(todo, fastest, strict=True):
            model._keep(candidate, ms)
        bar.close()
        model._refit(seed)
        return model

    def measure(self, candidate: Any) -> float:
        """Latency of the candidate, exported as deployed: the fastest of :data:`PASSES` medians
        measured on the device (interference only ever slows a measurement)."""
        data, shape = self.to_onnx(candidate)
        return min(float(self.device.measure(data, shape).median_ms) for _ in range(PASSES))

    def predict(self, candidates: Sequence[Any], *, measured: bool = True) -> np.ndarray:
        """Predicted milliseconds, safety factor included; a candidate measured on the device
        is predicted as measured (unless ``measured=False``: the model's own estimate)."""
        assert self.coef_ is not None, "fit first"
        candidates = list(candidates)
        out = self.scale_ * self._predict(self.coef_, self.predictor_, candidates)
        if not measured:
            return out
        measured_ms = {r["id"]: r["median_ms"] for r in self.records_}
        for i, candidate in enumerate(candidates):
            out[i] = measured_ms.get(candidate.key(), out[i])
        return out

    def _predict(
        self, coef: np.ndarray, trees: ArchPredictor | None, candidates: list[Any]
    ) -> np.ndarray:
        prior = structure(self.space, candidates) @ coef
        return prior if trees is None else prior * trees.predict(self.space.encode(candidates))

    def add(self, candidate: Any, measured_ms: float) -> None:
        """Learn from one more measurement (:meth:`measure`'s): keep it and refit."""
        self._keep(candidate, measured_ms)
        self._refit(0)

    def correct(self, candidate: Any, measured_ms: float) -> None:
        """Learn from a verification measurement: keep it, refit, and, where the model
        under-predicts it, raise the safety factor for every candidate not measured."""
        self.add(candidate, measured_ms)
        predicted = float(self.predict([candidate], measured=False)[0])
        if measured_ms > predicted:
            self.scale_ *= measured_ms / predicted

    def _keep(self, candidate: Any, median_ms: float) -> None:
        """Record a measurement, in the cache and in memory (replacing an older one)."""
        record = {"id": candidate.key(), "candidate": candidate.to_dict(), "median_ms": median_ms}
        append_record(self.cache, record)
        self.records_ = [r for r in self.records_ if r["id"] != record["id"]] + [record]

    def summary(self) -> dict[str, Any]:
        return {
            "samples": len(self.records_),
            "cache": str(self.cache),
            "scale": self.scale_,
            "holdout": self.holdout_,
            "slack": self.slack_,
        }

    def _refit(self, seed: int) -> None:
        from autocomp.spaces.candidate import Candidate

        candidates = [Candidate.from_dict(r["candidate"]) for r in self.records_]
        y = np.array([r["median_ms"] for r in self.records_], dtype=float)
        # Held-out accuracy (reported in the run's report) and slack, from out-of-fold
        # predictions: every measurement is predicted once by a model fitted without it.
        if len(y) >= 10:
            predicted = out_of_fold(
                len(y),
                lambda fit, rest: self._predict(
                    *self._fit([candidates[i] for i in fit], y[fit], seed),
                    [candidates[i] for i in rest],
                ),
                seed,
            )
            self.holdout_ = latency_metrics(y, predicted)
            over = np.maximum(predicted / y - 1.0, 0.0)
            self.slack_ = float(min(np.quantile(over, SLACK_QUANTILE), MAX_SLACK))
        self.coef_, self.predictor_ = self._fit(candidates, y, seed)

    def _fit(
        self, candidates: list[Any], y: np.ndarray, seed: int
    ) -> tuple[np.ndarray, ArchPredictor | None]:
        coef = fit_nonnegative(structure(self.space, candidates), y)
        if len(y) < TREES_FROM:
            return coef, None
        prior = structure(self.space, candidates) @ coef
        ratio = np.clip(y / np.maximum(prior, 1e-9), 1e-3, 1e3)
        return coef, ArchPredictor(random_state=seed).fit(self.space.encode(candidates), ratio)


#: Passes over the candidates to measure, keeping each one's fastest median. Interference from
#: other tenants of a shared host only ever slows a run, and comes in bursts of seconds that can
#: cover a whole short measurement: here int8 kernels ran 1.5x slower for seconds at a time while
#: fp32 ones barely changed, and of 6 passes over 42 mixed-precision mbv3 networks 26-86% of a
#: pass's medians lay within 5% of the fastest. Passes far apart in time rarely both hit a burst.
PASSES = 2

#: How the measurements in a cache were taken; a change of protocol starts a new cache. (Until
#: "bn-export", candidates were exported with fresh BatchNorms, see ``autocomp.api._to_onnx``.)
PROTOCOL = f"fastest-of-{PASSES}, bn-export"

#: :attr:`SpaceLatency.slack_` is this quantile of the held-out over-prediction (predicted /
#: measured - 1), capped at :data:`MAX_SLACK` so that a poor model cannot send the search far
#: beyond the budget (what it then misses, verification measures and corrects).
SLACK_QUANTILE = 0.9
MAX_SLACK = 0.5

#: Samples from which boosted trees correct the additive model (fewer would only add variance).
TREES_FROM = 100


def structure(space: Any, candidates: Sequence[Any]) -> np.ndarray:
    """Per candidate, what its latency is nearly additive in: for each op class (depthwise,
    pointwise, other conv, linear) at each precision (int8 or not) the MACs, the activation
    elements read and written, and the layer count; then the graph's other nodes and 1."""
    rows = np.zeros((len(candidates), 4 * 2 * 3 + 2))
    for row, candidate in enumerate(candidates):
        plan = space.plan(candidate)
        for spec in plan.layers.values():
            if spec.kind == "linear":
                op = 3
            else:
                op = 0 if spec.depthwise else 1 if spec.kernel == 1 else 2
            col = 6 * op + 3 * int(spec.bits <= 8)
            out = spec.hw[0] * spec.hw[1] * spec.cout
            rows[row, col] += out * (1 if spec.depthwise else spec.cin) * spec.kernel**2
            rows[row, col + 1] += out + spec.hw[0] * spec.hw[1] * spec.stride**2 * spec.cin
            rows[row, col + 2] += 1
        rows[row, -2] = space.extra_nodes(plan)
        rows[row, -1] = 1.0
    return rows


def default_cache(space: Any, device: Device) -> Path:
    """``<cache>/<profile>/space-<name>-<hash>.jsonl``, the hash covering everything that shapes
    the deployed networks: the YAML, its choices as restricted for the data (resolutions), and
    the input channels and classes, and the measurement :data:`PROTOCOL` (and reference timing:
    its latencies are at the host's calibrated speed, not comparable with plain ones)."""
    source = Path(space.source)
    if not source.is_file():  # a built-in space: its YAML is package data
        source = Path(str(resources.files("autocomp.builtin_spaces").joinpath(space.source)))
    digest = hashlib.sha1(source.read_bytes())
    shape = [space.in_channels, space.num_classes, [(p.name, p.choices) for p in space.params]]
    protocol = PROTOCOL
    if device.info.extra.get("timing") == "reference":  # latencies at a calibrated speed
        protocol += ", reference"
    digest.update(repr([shape, protocol]).encode())
    return cache_dir() / device.info.profile / f"space-{space.name}-{digest.hexdigest()[:12]}.jsonl"


def _unique(candidates: Sequence[Any]) -> list[Any]:
    seen: dict[str, Any] = {}
    for c in candidates:
        seen.setdefault(c.key(), c)
    return list(seen.values())
