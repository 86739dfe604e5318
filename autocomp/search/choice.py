"""Choosing the network to finetune and ship from a finished search: the device decides.

The search ranks candidates by inherited validation accuracy and screens them with predicted
latency. Both are estimates, so the choice measures the best-ranked candidates on the device,
reads accuracies within one standard error as ties, and finetunes a few contenders (the search's
picks and the hand-made baselines) before keeping one. ``latency`` is the run's latency model
(``predict``, ``measure``, ``correct``: :class:`~autocomp.latency.space.SpaceLatency` for a
supernet search, :class:`~autocomp.prune.latency.PolicyLatency` for compression).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

from autocomp.budget import Budget
from autocomp.spaces.candidate import Candidate

#: A row of :attr:`SearchResult.trials <autocomp.search.controller.SearchResult>`: number,
#: accuracy, candidate (as a dict), exact costs, predicted (and perhaps measured) latency.
Trial = dict[str, Any]

#: Most accurate candidates measured on the device before one is finetuned.
SHORTLIST = 12


def _candidate(row: Trial) -> Candidate:
    return Candidate.from_dict(row["candidate"])


def _key(row: Trial) -> str:
    return _candidate(row).key()


def evaluated(trials: list[Trial], tried: Collection[str] = ()) -> list[Trial]:
    """The trials that were scored (pruned and failed ones were not), less those ``tried``."""
    scored = [t for t in trials if t["accuracy"] is not None and t["candidate"] is not None]
    return [t for t in scored if _key(t) not in tried]


def screening(budget: Budget, slack: float) -> Budget:
    """The budget the search screens candidates with: the latency term widened by the latency
    model's measured over-prediction, so that candidates it wrongly puts over the budget are
    still evaluated (the device decides among them, :func:`measured_choice`)."""
    if budget.latency_ms is None:
        return budget
    return replace(budget, latency_ms=budget.latency_ms * (1.0 + slack))


def measured_choice(
    trials: list[Trial],
    latency: Any,
    budget: Budget,
    tried: list[str],
    log: list,
    n_val: int,
    measure: Callable[[Candidate], float] | None = None,
) -> Trial | None:
    """The most accurate evaluated candidate that meets the budget *as measured on the device*
    (``None`` if there is none).

    The search screens with predicted latency; a prediction off by 10% either way would
    otherwise pick a model under the budget, or one that misses it. So the most accurate
    candidates whose exact terms meet the budget are measured (``SHORTLIST`` at most, export +
    fastest of two medians each) and the first that meets it wins; each measurement also
    corrects the latency model. If none does, the corrected model chooses among the rest. Every
    measurement is appended to ``log``. ``measure`` times a candidate as verification will
    (default ``latency.measure``).

    "Most accurate" is read with the validation split's noise in mind (``n_val`` images): the
    candidates within one standard error of the best score are tied, and among them the one with
    the most MACs goes first. Inherited scores that close are not evidence of a better network
    (on digits_hard the 15 best of 40 lay within 4 points, the standard error being 2.7), while
    capacity is what the finetune makes use of.
    """
    exact = replace(budget, latency_ms=None)
    rows = [t for t in evaluated(trials, tried) if exact.is_met(**{k: t[k] for k in exact.terms()})]
    ranked = sorted(rows, key=lambda t: -t["accuracy"])
    if ranked:
        band = tied_with(ranked[0]["accuracy"], n_val)
        tied = sorted((t for t in ranked if t["accuracy"] >= band), key=lambda t: -t["macs"])
        ranked = tied + [t for t in ranked if t["accuracy"] < band]
    if budget.latency_ms is None:
        return ranked[0] if ranked else None
    logged = {m["key"]: m for m in log}
    fresh = 0
    for row in ranked:
        candidate = Candidate.from_dict(row["candidate"])
        key = candidate.key()
        if key not in logged:
            if fresh == SHORTLIST:
                break
            fresh += 1
            estimate = float(latency.predict([candidate], measured=False)[0])
            ms = (measure or latency.measure)(candidate)
            latency.correct(candidate, ms)
            logged[key] = {
                "number": row["number"],
                "key": key,
                "accuracy": row["accuracy"],
                "latency_predicted_ms": estimate,  # the model's, not a seed's measurement
                "latency_measured_ms": ms,
            }
            log.append(logged[key])
        m = logged[key]
        if m["latency_measured_ms"] <= budget.latency_ms:
            return row | {k: m[k] for k in ("latency_predicted_ms", "latency_measured_ms")}
    return rechoose(trials, latency, budget, [*tried, *logged])


#: Candidates of the ranking (:func:`measured_choice`) finetuned before one is chosen.
CONTENDERS = 2
#: Share of a latency budget from which a candidate counts as using it (issue 6's 80%).
FILLS = 0.8


def contenders(
    choose: Callable[..., Trial | None],
    trials: list[Trial],
    baselines: list[Candidate],
    latency: Any,
    budget: Budget,
    nested: bool = False,
) -> list[Trial]:
    """What :func:`arbitrate` finetunes: the first ``CONTENDERS`` candidates ``choose(tried,
    among=trials)`` gives that meet the budget as measured (the first may rest on the corrected
    latency model alone, as a lone choice would); under a latency budget, the same choice among
    the candidates predicted to use at least ``FILLS`` of it (inherited scores undervalue the
    larger networks that the finetune lifts most); then every baseline among the evaluated
    trials (:func:`~autocomp.search.seeding.search_seeds`; each met the budget when it was
    measured, or by exact terms).

    With ``nested`` (a supernet's subnets), a candidate that is a subnet of another contender or
    baseline at no more bits (:meth:`Candidate.within`) is not a contender: once both meet the
    budget it cannot be expected to be the more accurate, and finetuning it only costs time
    (where the budget does not bind, the largest network, a seed, contains every other). The
    seeds' rule (:func:`~autocomp.search.seeding.search_seeds`), for every contender.
    ``compress`` keeps them: its contenders' accuracy hardly follows their keep ratios
    (:func:`arbitrate`)."""
    by_key = {_key(t): t for t in evaluated(trials)}
    bases = [by_key[b.key()] for b in baselines if b.key() in by_key]
    picks: list[Trial] = []

    def contained(row: Trial, among: list[Trial]) -> bool:
        if not nested:
            return False
        candidate = _candidate(row)
        return any(_key(o) != candidate.key() and candidate.within(_candidate(o)) for o in among)

    while len(picks) < CONTENDERS:
        tried = [_key(r) for r in picks]
        among = [t for t in by_key.values() if not contained(t, picks + bases)]
        row = choose(tried, among=among) if nested else choose(tried)
        if row is None or (picks and budget.latency_ms and "latency_measured_ms" not in row):
            break
        picks.append(row)
    if budget.latency_ms and picks:
        rows = [t for t in by_key.values() if not contained(t, picks + bases)]
        predicted = latency.predict([_candidate(t) for t in rows])
        filling = [
            t for t, ms in zip(rows, predicted, strict=True) if ms >= FILLS * budget.latency_ms
        ]
        row = choose([_key(r) for r in picks], among=filling)
        if row is not None and "latency_measured_ms" in row:
            picks.append(row)
    chosen = {_key(r) for r in picks}
    for row in bases:
        if _key(row) not in chosen:
            estimate = float(latency.predict([_candidate(row)], measured=False)[0])
            picks.append(row | {"latency_predicted_ms": estimate, "baseline": True})
    return [row for row in picks if not contained(row, picks)]


def tied_with(best: float, n_val: int) -> float:
    """The lowest validation accuracy tied with ``best`` on ``n_val`` images: one standard
    error below it."""
    return best - math.sqrt(best * (1 - best) / max(n_val, 1))


def arbitrate(
    contenders: list[Trial],
    finetune: Callable[[Candidate, Trial], tuple[Any, dict[str, Any]]],
    n_val: int,
) -> tuple[Trial | None, list[dict[str, Any]]]:
    """Finetune every contender and keep the one most accurate on validation (``n_val`` images)
    afterwards, reading accuracies within one standard error of the best as ties, which go to
    the lowest validation cross-entropy (``val_loss`` of the finetune's report; then the
    ranking's order): it counts how sure every answer is, so it still separates models whose
    accuracies tie on a few hundred images.

    Why not the most MACs, as the search did before: its tie band holds subnets of one
    supernet, and the larger ones were thought to gain most from the finetune. Finetuned again
    and scored on test (``experiments/arbitration_on_test.py``, three 1 ms searches on
    digits_hard), the lowest cross-entropy shipped 77.07% on the mean, the most MACs 76.33% and
    the highest validation accuracy 76.17% (the uniform baseline among them: 75.59%); in one
    of the three, the most MACs was the baseline itself, 2.1 points below the surest contender.
    The contenders of ``compress``, all cut from one trained network, agree
    (``experiments/compress_peers.py``, v11): the lowest cross-entropy shipped the one most
    accurate on test in each of mobilenetv3's 5 seeds (39.4% on the mean, the most MACs 37.8%)
    and was level on resnet18's 10 (69.12% against 69.16%).

    Inherited scores rank before the finetune, and the finetune does not lift every network
    alike: on digits_hard the 64² uniform scalings scored 4-5 points below the best 48²
    candidates with inherited weights and 2 points above them finetuned. Measuring the
    contenders after the finetune makes the choice on what is shipped, with the hand-made
    baselines among them. Returns the choice and one row per contender."""
    table = []
    for row in contenders:
        candidate = Candidate.from_dict(row["candidate"])
        _, tuned = finetune(candidate, row)
        table.append(
            {
                "number": row["number"],
                "key": candidate.key(),
                "baseline": bool(row.get("baseline")),
                "inherited_val_accuracy": row["accuracy"],
                "finetuned_val_accuracy": tuned["val_accuracy"],
                "finetuned_val_loss": tuned["val_loss"],
                "macs": row.get("macs"),
            }
        )
    if not table:
        return None, table
    band = tied_with(max(row["finetuned_val_accuracy"] for row in table), n_val)
    tied = [i for i, row in enumerate(table) if row["finetuned_val_accuracy"] >= band]
    best = min(tied, key=lambda i: (table[i]["finetuned_val_loss"], i))
    table[best]["chosen"] = True
    return contenders[best], table


def rechoose(trials: list[Trial], latency: Any, budget: Budget, tried: list[str]) -> Trial | None:
    """The most accurate evaluated candidate that meets the budget under the corrected latency."""
    rows = evaluated(trials, tried)
    if not rows:
        return None
    predicted = latency.predict([_candidate(t) for t in rows])
    ok = []
    for row, ms in zip(rows, predicted, strict=True):
        costs = {k: row.get(k) for k in ("flops", "params", "size_bytes")}
        costs["latency_ms"] = float(ms)
        if budget.is_met(**{k: costs[k] for k in budget.terms()}):
            ok.append(row | {"latency_predicted_ms": float(ms)})
    return max(ok, key=lambda t: t["accuracy"]) if ok else None
