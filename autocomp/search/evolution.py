"""OFA-style evolutionary search on predictors: thousands of candidates scored in seconds.

The fitness is the accuracy predictor, the constraint the exact costs and the latency predictor;
no candidate is evaluated here. The controller sends the fittest new ones to a direct supernet
evaluation, refits the predictor on the result and evolves again, so that predictor errors are
corrected where the search actually goes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from autocomp.spaces.candidate import Candidate

Fitness = Callable[[list[Candidate]], np.ndarray]
Feasible = Callable[[list[Candidate]], np.ndarray]

#: Rounds of proposals tried before a generation gives up on producing enough feasible children.
MAX_ROUNDS = 8


def evolve(
    space: Any,
    fitness: Fitness,
    feasible: Feasible,
    rng: np.random.Generator,
    *,
    seeds: Sequence[Candidate] = (),
    population: int = 48,
    generations: int = 10,
    parent_ratio: float = 0.25,
    mutation_ratio: float = 0.5,
    mutate_prob: float = 0.1,
) -> list[tuple[Candidate, float]]:
    """The final population, fittest first, as ``(candidate, fitness)``; every one is feasible.

    ``seeds`` (e.g. the best candidates evaluated so far) start the population, random feasible
    candidates fill it. Each generation keeps the top ``parent_ratio`` as parents and breeds the
    rest by mutation (``mutation_ratio`` of them, each choice resampled with ``mutate_prob``) and
    crossover, as OFA's evolution finder does.
    """
    start = [c for c, ok in zip(seeds, feasible(list(seeds)), strict=True) if ok] if seeds else []
    start = _unique(start + feasible_samples(lambda: space.sample(rng), population, feasible))
    if not start:
        return []
    pool = _rank(start, fitness)[:population]
    n_parents = max(2, int(parent_ratio * population))
    n_mutants = int(mutation_ratio * population)
    for _ in range(generations):
        parents = [c for c, _ in pool[:n_parents]]
        mutant = partial(_mutant, space, parents, rng, mutate_prob)
        children = feasible_samples(mutant, n_mutants, feasible)
        child = partial(_child, space, parents, rng)
        children += feasible_samples(child, population - n_parents - n_mutants, feasible)
        known = {c.key(): s for c, s in pool}
        fresh = _unique([c for c in children if c.key() not in known])
        pool = sorted([*pool, *_rank(fresh, fitness)], key=lambda cs: -cs[1])[:population]
    return pool


def feasible_samples(make: Callable[[], Candidate], n: int, feasible: Feasible) -> list[Candidate]:
    """Up to ``n`` feasible candidates from ``make``, in batches (the latency model is batched)."""
    out: list[Candidate] = []
    for _ in range(MAX_ROUNDS):
        if len(out) >= n:
            break
        batch = [make() for _ in range(2 * (n - len(out)))]
        out += [c for c, ok in zip(batch, feasible(batch), strict=True) if ok]
    return out[:n]


def _mutant(
    space: Any, parents: list[Candidate], rng: np.random.Generator, prob: float
) -> Candidate:
    return space.mutate(parents[rng.integers(len(parents))], rng, prob)


def _child(space: Any, parents: list[Candidate], rng: np.random.Generator) -> Candidate:
    a, b = rng.choice(len(parents), size=2, replace=len(parents) < 2)
    return space.crossover(parents[a], parents[b], rng)


def _rank(candidates: list[Candidate], fitness: Fitness) -> list[tuple[Candidate, float]]:
    if not candidates:
        return []
    scores = np.asarray(fitness(candidates), dtype=float)
    return sorted(zip(candidates, scores.tolist(), strict=True), key=lambda cs: -cs[1])


def _unique(candidates: list[Candidate]) -> list[Candidate]:
    seen: dict[str, Candidate] = {}
    for c in candidates:
        seen.setdefault(c.key(), c)
    return list(seen.values())
