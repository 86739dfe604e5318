"""What a search starts from: the hand-made networks it must beat, evaluated first.

A search over a supernet is seeded with the largest candidate and, per precision, the widest
uniform width scaling that fits the budget as measured; a compression search with the usual
uniform policies on its keep-ratio grid (every group at one keep ratio, all int8 or all fp32).
The sampler learns from them. The choice (:mod:`autocomp.search.choice`) finetunes the baselines
next to its own picks: a compression's are the uniform policies that just fit, found on a finer
grid (:func:`uniform_baselines`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna

from autocomp.budget import Budget
from autocomp.search.costs import CostModel
from autocomp.search.storage import open_storage
from autocomp.spaces.candidate import Candidate


def uniform_scalings(space: Any, bits: int) -> list[Candidate]:
    """The hand-made baseline a search must beat: the space's full network (deepest stages,
    largest kernels and expansions, highest resolution) scaled by one width knob, every stage at
    the same width choice and every layer at the same keep ratio, all layers at ``bits``; the
    most MACs first."""
    values = space.values(space.largest())
    widths = {p.name for p in space.params if p.name.startswith("arch.width.") and p.name in values}
    keeps = sorted({v for p in space.params if p.section == "widths" for v in p.choices})
    grid = []
    steps = [len(p.choices) for p in space.params if p.name in widths]
    for index in range(max(steps, default=1)):
        for keep in keeps:
            scaled = dict(values)
            for p in space.params:
                if p.name not in values:
                    continue
                if p.name in widths:
                    scaled[p.name] = p.choices[min(index, len(p.choices) - 1)]
                elif p.section == "widths" and keep in p.choices:
                    scaled[p.name] = keep
                elif p.section == "bits" and bits in p.choices:
                    scaled[p.name] = bits
            grid.append(space.from_values(scaled))
    grid = list({c.key(): c for c in grid}.values())
    return sorted(grid, key=lambda c: space.cost(c).macs, reverse=True)


def search_seeds(
    space: Any, budget: Budget, screening: Budget, latency: Any, log: list | None = None
) -> tuple[list[Candidate], list[Candidate]]:
    """What a search evaluates first, and the baselines among them: the largest candidate (which
    wins outright where the budget does not bind) and, per precision, the widest uniform scaling
    (:func:`uniform_scalings`) that meets the budget, the hand-made baseline the choice must beat
    (:func:`~autocomp.search.choice.arbitrate`). Under a latency budget the widest of the
    scalings that pass screening that meets the budget as measured is found by
    :func:`widest_fitting`: the latency model learns those measurements, and it is least sure of
    such all-int8 or all-fp32 networks. Each measurement is appended to ``log``.

    A precision's scaling that is no wider (no more MACs) than a higher precision's that also
    fits is a seed but not a baseline: it is the same network or a narrower one with fewer bits,
    so once both meet the budget it cannot be expected to be the more accurate, and finetuning it
    too only costs time (where the budget does not bind, the all-int8 largest network)."""
    costs = CostModel(space, screening, latency.predict)
    widest: dict[int, Candidate] = {}
    for bits in sorted({b for p in space.params if p.section == "bits" for b in p.choices}):
        grid = uniform_scalings(space, bits)
        admitted = [c for c, ok in zip(grid, costs.feasible_mask(grid), strict=True) if ok]
        if budget.latency_ms is None:
            found = admitted[0] if admitted else None
        else:

            def fits(candidate, bits=bits, limit=budget.latency_ms) -> bool:
                ms = latency.measure(candidate)
                latency.add(candidate, ms)
                if log is not None:
                    macs = space.cost(candidate).macs
                    row = {"bits": bits, "key": candidate.key(), "macs": macs, "measured_ms": ms}
                    log.append(row | {"fits": ms <= limit})
                return ms <= limit

            found = widest_fitting(admitted, fits)
        if found is not None:
            widest[bits] = found
    macs = {bits: space.cost(c).macs for bits, c in widest.items()}
    baselines = [
        c
        for bits, c in widest.items()
        if not any(more > bits and macs[more] >= macs[bits] for more in widest)
    ]
    seeds = list({c.key(): c for c in [space.largest(), *widest.values()]}.values())
    return seeds, baselines


#: Uniform scalings measured per precision, at most, to seed a search (:func:`search_seeds`).
SEED_MEASUREMENTS = 4


def widest_fitting(
    scalings: list, fits: Callable[[Any], bool], calls: int = SEED_MEASUREMENTS
) -> Any:
    """The first of ``scalings`` (widest first, so latency falls along them) for which
    ``fits`` (a measurement) holds, in at most ``calls`` calls: the widest first
    (where the budget does not bind, one measurement), then bisection. Measuring down the list
    instead can spend every call on scalings just over the budget, which screening admits with
    the latency model's slack (at 1 ms on digits_hard the 64² fp32 scalings that measure 0.92 and
    0.99 ms are the eighth and seventh widest). ``None`` if no measured one fits."""
    if not scalings:
        return None
    if fits(scalings[0]):
        return scalings[0]
    best, lo, hi = None, 1, len(scalings) - 1  # scalings[lo - 1] is known to miss
    for _ in range(calls - 1):
        if lo > hi:
            break
        mid = (lo + hi) // 2
        if fits(scalings[mid]):
            best, hi = scalings[mid], mid - 1
        else:
            lo = mid + 1
    return best


def anchor_policies(space: Any) -> list[Candidate]:
    """The policies a compression search starts from, the usual hand-made ones: the whole model
    in int8, then every group at each keep ratio (uniform pruning) in int8 and in fp32."""
    bit_choices = [b for b in (8, 32) if b in space.bit_choices]
    ratios = sorted(space.keep_ratios, reverse=True)
    anchors = []
    for ratio in ratios:
        for bits in bit_choices:
            values = {p.name: ratio if p.section == "widths" else bits for p in space.params}
            anchors.append(space.from_values(values))
    largest = space.largest()
    unique = {c.key(): c for c in anchors if c.key() != largest.key()}
    return list(unique.values())


#: Keep-ratio step of the uniform policies a compression baseline is chosen among
#: (:func:`uniform_policies`): finer than the search's grid, as a user pruning uniformly picks the
#: ratio that just fits. On eighths, resnet18 at half its fp32 latency fell back from 0.875 (just
#: over) to 0.75 in int8, while Torch-Pruning + PTQ kept 0.90 and finetuned 0.4 point higher.
UNIFORM_STEP = 1 / 64


def uniform_policies(space: Any, bits: int) -> list[Candidate]:
    """Uniform pruning as it is done by hand: every group at one keep ratio, from the space's
    smallest to 1 in steps of ``UNIFORM_STEP``, every layer at ``bits``; one policy per distinct
    set of channel counts (the pruner rounds them), widest first."""
    low = min(space.keep_ratios)
    ratios = [1 - i * UNIFORM_STEP for i in range(int((1 - low) / UNIFORM_STEP + 1e-9) + 1)]
    distinct: dict[tuple[int, ...], Candidate] = {}
    for ratio in ratios:
        channels = tuple(g.keep(ratio) for g in space.groups)
        if channels not in distinct:
            values = {p.name: ratio if p.section == "widths" else bits for p in space.params}
            distinct[channels] = space.from_values(values)
    return list(distinct.values())


def uniform_baselines(
    space: Any,
    budget: Budget,
    measure: Callable[[Candidate], float],
    confirm: Callable[[Candidate], float] | None = None,
) -> list[Candidate]:
    """Per precision, the widest uniform policy (:func:`uniform_policies`) that meets the
    budget: its exact terms, then under a latency budget the device's (``measure``, a short
    timing: bisection, as :func:`widest_fitting`), and ``confirm`` (a verification's timing)
    on the one found, stepping to narrower ones while it misses (``CONFIRMATIONS`` at most).
    These hand-made policies are finetuned beside the search's picks
    (:func:`~autocomp.search.choice.arbitrate`), so compression ships nothing less accurate than
    the uniform pruning a user would tune by hand."""
    exact = replace(budget, latency_ms=None)
    baselines = []
    for bits in space.bit_choices:
        grid = uniform_policies(space, bits)
        if exact.terms():  # costing builds each pruned network: only where a term needs it
            mask = CostModel(space, exact).feasible_mask(grid)
            grid = [c for c, ok in zip(grid, mask, strict=True) if ok]
        if budget.latency_ms is None:
            baselines += grid[:1]
            continue
        calls = len(grid).bit_length() + 1  # the widest, then bisection to one policy
        widest = widest_fitting(grid, lambda c: measure(c) <= budget.latency_ms, calls)
        if widest is not None and confirm is not None:
            # One session's short timing can read 10% fast (resnet18 int8: 0.190 ms, then 0.209
            # ms in verification), and a baseline that misses is replaced by the search's pick.
            tries = grid[grid.index(widest) :][:CONFIRMATIONS]
            widest = next((c for c in tries if confirm(c) <= budget.latency_ms), None)
        baselines += [widest] if widest is not None else []
    return baselines


#: Narrower uniform policies tried, at most, when the one found misses on confirmation.
CONFIRMATIONS = 3


def seed_study(space: Any, sampler: str, storage: str | None, run_dir: Path) -> None:
    """Create the run's study with :func:`anchor_policies` queued as its first trials, so that
    the search starts from the hand-made policies (infeasible ones are screened out for free)
    and its sampler learns from them."""
    store, _ = open_storage(storage, run_dir)
    directions = ["maximize", "minimize"] if sampler == "nsga2" else ["maximize"]
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            storage=store, study_name="search", directions=directions, load_if_exists=True
        )
        for anchor in anchor_policies(space):
            study.enqueue_trial(space.values(anchor), skip_if_exists=True)
    finally:
        optuna.logging.set_verbosity(level)
