"""What a candidate costs against a budget: exact from the space, latency predicted or measured.

MACs, FLOPs (= 2·MACs), params and exported size come from ``space.cost`` (analytic, exact). Latency
comes from callables the caller injects, so that the search does not care how they were built:
``latency_fn(candidates) -> ms`` (the device's fitted arch-level predictor, vectorised) and
``measure_fn(candidate) -> ms`` (a real measurement on the device, slow). A measured latency, when
there is one, is the truth and overrides the prediction in every budget check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna

from autocomp.budget import Budget
from autocomp.errors import AutocompError
from autocomp.spaces.candidate import Candidate

LatencyFn = Callable[[list[Candidate]], np.ndarray]
MeasureFn = Callable[[Candidate], float]

#: Random candidates probed, besides the smallest and its variants, to bound each term from below.
N_PROBES = 32


class CostModel:
    """Costs of candidates and their budget constraints, in Optuna's convention (≤ 0: feasible).

    A constraint is ``cost / limit - 1``: scale-free, so that terms in milliseconds, FLOPs and
    bytes weigh alike when a sampler ranks infeasible candidates by their total violation.
    """

    def __init__(
        self,
        space: Any,
        budget: Budget,
        latency_fn: LatencyFn | None = None,
        measure_fn: MeasureFn | None = None,
    ) -> None:
        if budget.latency_ms is not None and latency_fn is None and measure_fn is None:
            raise AutocompError(
                "the budget constrains latency but neither a latency predictor nor a device to "
                "measure on was given"
            )
        self.space = space
        self.budget = budget
        self.latency_fn = latency_fn
        self.measure_fn = measure_fn

    def costs(self, candidates: Sequence[Candidate]) -> list[dict[str, float]]:
        """Exact costs of each candidate, plus ``latency_predicted_ms`` when a predictor is set."""
        rows: list[dict[str, float]] = [dict(self.space.cost(c).to_dict()) for c in candidates]
        if self.latency_fn is not None and rows:
            ms = np.asarray(self.latency_fn(list(candidates)), dtype=float).reshape(-1)
            if ms.shape != (len(rows),) or not np.all(np.isfinite(ms)):
                raise ValueError(
                    f"latency_fn returned {ms.shape[0]} values for {len(rows)} candidates "
                    "(or non-finite ones)"
                )
            for row, value in zip(rows, ms, strict=True):
                row["latency_predicted_ms"] = float(value)
        return rows

    def measure(self, candidate: Candidate) -> float:
        """Latency measured on the device, in milliseconds."""
        assert self.measure_fn is not None
        return float(self.measure_fn(candidate))

    def constraints(self, row: dict[str, float]) -> dict[str, float]:
        """``{term: cost / limit - 1}`` for every budget term whose cost is known in ``row``."""
        out = {}
        for term, limit in self.budget.terms().items():
            cost = latency(row) if term == "latency_ms" else row.get(term)
            if cost is not None:
                out[term] = cost / limit - 1
        return out

    def feasible(self, row: dict[str, float]) -> bool:
        """No known term violates the budget (unknown ones are checked once they are known)."""
        return all(v <= 0 for v in self.constraints(row).values())

    def feasible_mask(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """Vectorised pre-filter for the evolutionary search: exact costs + predicted latency."""
        return np.array([self.feasible(row) for row in self.costs(candidates)], dtype=bool)

    def check_achievable(self, rng: np.random.Generator) -> None:
        """Refuse a budget that no candidate of the space can meet, before anything is spent.

        Probes the smallest candidate, its variants with every layer at one bitwidth (int8 is not
        always the fastest) and a few random ones; if none meets every term, the message gives the
        smallest cost found for each term.
        """
        if not self.budget.terms():
            return
        probes = _probes(self.space, rng)
        rows = self.costs(probes)
        if self.latency_fn is None and self.measure_fn is not None and self.budget.latency_ms:
            rows = rows[:1]
            rows[0]["latency_measured_ms"] = self.measure(probes[0])
        if any(self.feasible(row) for row in rows):
            return
        parts = []
        for term, limit in self.budget.terms().items():
            values = [latency(r) if term == "latency_ms" else r[term] for r in rows]
            parts.append(_describe(term, min(values), limit, rows))
        raise AutocompError(
            f"no candidate of space {self.space.name!r} meets budget {self.budget}; smallest "
            f"achievable: {', '.join(parts)}"
        )


def latency(row: dict[str, float]) -> float | None:
    """The latency a budget is checked against: measured when measured, else predicted."""
    return row.get("latency_measured_ms", row.get("latency_predicted_ms"))


def _probes(space: Any, rng: np.random.Generator) -> list[Candidate]:
    smallest = space.smallest()
    values = space.values(smallest)
    bits = [p for p in space.params if p.section == "bits" and p.name in values]
    probes = [smallest]
    for b in sorted({c for p in bits for c in p.choices}):
        variant = {**values, **{p.name: b for p in bits if b in p.choices}}
        probes.append(space.suggest(optuna.trial.FixedTrial(variant)))
    return probes + [space.sample(rng) for _ in range(N_PROBES)]


def _describe(term: str, value: float, limit: float, rows: list[dict[str, float]]) -> str:
    if term == "latency_ms":
        how = "measured" if "latency_measured_ms" in rows[0] else "predicted"
        return f"latency {value:.3g} ms ({how}; budget {limit:g} ms)"
    if term == "flops":
        return f"{value / 1e6:.4g}M FLOPs = 2·{value / 2e6:.4g}M MACs (budget {limit / 1e6:g}M)"
    if term == "params":
        return f"{value / 1e6:.4g}M params (budget {limit / 1e6:g}M)"
    return f"size {value / 1e6:.4g} MB (budget {limit / 1e6:g} MB)"
