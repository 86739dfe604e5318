"""The budgeted joint search: one Optuna study over candidates, budgets as constraints.

Every proposal is an Optuna trial; the space speaks ``trial.suggest_*``. Before a candidate costs
an accuracy evaluation it is screened: exact MACs/params/size and predicted (or, every k-th trial,
measured) latency are checked against the budget, and a violation is recorded as a PRUNED trial
with its constraint values (``trial.set_constraint``, Optuna's successor of ``constraints_func``),
which TPE and NSGA-II read to steer away from infeasible regions. A candidate already evaluated
is not evaluated again. So the study's COMPLETE trials are exactly the direct evaluations, and
``n_trials`` counts those — the expensive part.

Samplers: ``tpe`` (default), ``random``, ``nsga2`` (accuracy vs latency or FLOPs; the Pareto front
is the result) and ``evolution`` (OFA: evolution on the accuracy and latency predictors, the
fittest new candidates sent to direct evaluation and recorded in the same study). Everything is
seeded: the same seed gives the same trials with the local backend (up to measurement noise).
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, Trial, TrialState
from tqdm.auto import tqdm

from autocomp.budget import Budget
from autocomp.errors import AutocompError
from autocomp.search.accuracy import KINDS, AccuracyPredictor, candidate_features
from autocomp.search.costs import CostModel, LatencyFn, MeasureFn, latency
from autocomp.search.evolution import evolve, feasible_samples
from autocomp.search.storage import claim, existing_trials, open_storage, recover_orphans
from autocomp.spaces.candidate import Candidate

SAMPLERS = ("tpe", "nsga2", "random", "evolution")
BACKENDS = ("local", "ray")
TRADEOFFS = ("latency_ms", "flops")
EXACT = ("macs", "flops", "params", "size_bytes")
LATENCIES = ("latency_predicted_ms", "latency_measured_ms")
EvaluateFn = Callable[[Candidate], float]


@dataclass
class EvolutionOptions:
    """The ``evolution`` sampler: ``n_init`` random feasible candidates are evaluated first
    (default: a third of ``n_trials``, at least 8), then each round fits the accuracy predictor on
    every evaluation so far, evolves ``population`` candidates for ``generations`` on the
    predictors and sends the ``batch`` fittest new ones to direct evaluation."""

    n_init: int | None = None
    batch: int = 4
    population: int = 48
    generations: int = 10
    mutate_prob: float = 0.1
    predictor: str = "gbdt"


@dataclass
class SearchResult:
    """The chosen candidate and everything needed to audit the choice (all JSON-ready but
    ``best``). ``best_metrics`` and each entry of ``pareto``/``trials`` are trial records: trial
    number, state, status, accuracy, MACs, FLOPs, params, size, latency predicted/measured."""

    best: Candidate
    best_metrics: dict[str, Any]
    pareto: list[dict[str, Any]]
    trials: list[dict[str, Any]]
    study_name: str
    storage_url: str
    n_evaluated: int = 0
    notes: list[str] = field(default_factory=list)


def run_search(
    space: Any,
    budget: Budget | str,
    *,
    evaluate_fn: EvaluateFn,
    run_dir: str | Path,
    latency_fn: LatencyFn | None = None,
    measure_fn: MeasureFn | None = None,
    measure_every: int = 0,
    sampler: str = "tpe",
    n_trials: int = 50,
    seed: int = 0,
    storage: str | Path | optuna.storages.BaseStorage | None = None,
    study_name: str = "search",
    resume: bool = False,
    backend: str = "local",
    ray_address: str | None = None,
    workers: int = 2,
    max_retries: int = 3,
    tradeoff: str | None = None,
    rerank_fn: EvaluateFn | None = None,
    top_k: int = 5,
    evolution: EvolutionOptions | None = None,
    max_proposals: int | None = None,
    first: Sequence[Candidate] = (),
    progress: bool = True,
) -> SearchResult:
    """Search the most accurate candidate of ``space`` that meets ``budget``.

    ``evaluate_fn(candidate) -> accuracy`` scores a candidate directly (the pipeline wires it to
    the supernet with BN recalibration, on the validation split carved from the training data).
    ``latency_fn(candidates) -> ms`` is the device's fitted predictor; ``measure_fn(candidate) ->
    ms`` measures on the device — every trial when there is no predictor, else every
    ``measure_every``-th trial (0: never). ``n_trials`` direct evaluations are made (the proposals
    screened out by the budget or as duplicates are free), at most ``max_proposals`` proposals
    (default 50·n_trials). With ``rerank_fn`` (e.g. the full validation split), the ``top_k``
    best are re-evaluated by it before choosing. ``first``: candidates to evaluate before the
    sampler proposes any (those that meet the budget; a fresh study only), e.g. the largest
    candidate, which wins outright when the budget does not bind. ``resume`` continues the study
    in ``storage`` (default: ``run_dir/study.db``) up to ``n_trials`` evaluations in all; without
    it a study that already holds trials is refused. ``backend="ray"`` runs up to ``workers``
    evaluations at once as Ray tasks (see :mod:`autocomp.search.ray_backend`).
    """
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    evolution = evolution or EvolutionOptions()
    _check_options(sampler, backend, n_trials, workers, measure_every, measure_fn, tradeoff, top_k)
    if evolution.predictor not in KINDS:
        raise AutocompError(
            f"unknown accuracy predictor {evolution.predictor!r}; use one of {KINDS}"
        )
    costs = CostModel(space, budget, latency_fn, measure_fn)
    tradeoff = tradeoff or ("latency_ms" if latency_fn or measure_fn else "flops")
    if tradeoff == "latency_ms" and latency_fn is None and measure_fn is None:
        raise AutocompError("tradeoff 'latency_ms' needs a latency predictor or a device")
    run_dir = Path(run_dir)
    config = {
        "space": space.name,
        "sampler": sampler,
        "budget": budget.terms(),
        "tradeoff": tradeoff if sampler == "nsga2" else None,
    }
    if not resume and existing_trials(storage, run_dir, study_name):
        raise AutocompError(
            f"study {study_name!r} in {storage or run_dir / 'study.db'} already holds trials; "
            "resume it (--resume) or choose another run folder or study name"
        )
    costs.check_achievable(np.random.default_rng(seed))

    run_dir.mkdir(parents=True, exist_ok=True)
    store, url = open_storage(storage, run_dir)
    with _quiet_optuna():
        study = optuna.create_study(
            storage=store,
            study_name=study_name,
            directions=["maximize", "minimize"] if sampler == "nsga2" else ["maximize"],
            load_if_exists=True,
        )
        _check_config(study, config, url)
        notes = [
            f"trial {n} was left running by a killed process: failed, re-queued"
            for n in recover_orphans(study)
        ]
        # Derive the sampler's seed from the history too: a resumed run must not replay the
        # proposals (and so the candidates) that its killed predecessor already made.
        if first and not study.trials:
            for candidate, ok in zip(first, costs.feasible_mask(list(first)), strict=True):
                if ok:
                    study.enqueue_trial(space.values(candidate))
        sub_seed = int(np.random.SeedSequence([seed, len(study.trials)]).generate_state(1)[0])
        study.sampler = _make_sampler(sampler, sub_seed, n_trials)
        executor = _executor(backend, evaluate_fn, workers, ray_address, max_retries)
        if sampler == "evolution":
            proposer: _Proposer = _EvolutionProposer(
                space, costs, sub_seed, n_trials, evolution, executor.capacity
            )
        else:
            proposer = _Proposer(space)
        try:
            driver = _Driver(study, proposer, costs, executor, sampler, tradeoff, measure_every)
            exhausted = driver.run(n_trials, max_proposals or 50 * n_trials, progress)
        finally:
            executor.close()
        if exhausted:
            notes.append(exhausted)
            warnings.warn(exhausted, stacklevel=2)
        return _result(study, url, tradeoff, rerank_fn, top_k, notes)


def _check_options(
    sampler: str,
    backend: str,
    n_trials: int,
    workers: int,
    measure_every: int,
    measure_fn: MeasureFn | None,
    tradeoff: str | None,
    top_k: int,
) -> None:
    if sampler not in SAMPLERS:
        raise AutocompError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if backend not in BACKENDS:
        raise AutocompError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if tradeoff is not None and tradeoff not in TRADEOFFS:
        raise AutocompError(f"unknown tradeoff {tradeoff!r}; use one of {', '.join(TRADEOFFS)}")
    for name, value, low in (
        ("n_trials", n_trials, 1),
        ("workers", workers, 1),
        ("measure_every", measure_every, 0),
        ("top_k", top_k, 1),
    ):
        if int(value) != value or value < low:
            raise AutocompError(f"{name} must be a whole number ≥ {low}, got {value!r}")
    if measure_every and measure_fn is None:
        raise AutocompError("measure_every needs a device to measure on (measure_fn)")


def _check_config(study: optuna.Study, config: dict[str, Any], url: str) -> None:
    """A study continues only the search it was created for (same space, sampler, budget)."""
    old = study.user_attrs.get("autocomp")
    if old is None:
        study.set_user_attr("autocomp", config)
        return
    for key, value in config.items():
        if old.get(key) != value:
            raise AutocompError(
                f"study {study.study_name!r} in {url} was created with {key} {old.get(key)!r}, "
                f"not {value!r}; use another study name or run folder"
            )


def _make_sampler(name: str, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=seed,
                n_startup_trials=min(10, max(4, n_trials // 5)),
                multivariate=True,
                group=True,
            )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=min(50, max(8, n_trials // 5))
        )
    # "random"; "evolution" enqueues every candidate it proposes, so its sampler is never asked.
    return optuna.samplers.RandomSampler(seed=seed)


# ----------------------------------------------------------------------------- proposing


class _Proposer:
    """Asks the study's sampler: the space answers ``trial.suggest_*``."""

    def __init__(self, space: Any) -> None:
        self.space = space

    def ask(self, study: optuna.Study, busy: set[str]) -> tuple[Trial, Candidate]:
        trial = study.ask()
        claim(trial)
        return trial, self.space.suggest(trial)


class _EvolutionProposer(_Proposer):
    """Plans batches by evolution on the predictors and enqueues them as trials (their params are
    the candidate's choices, so the study holds them exactly like sampled ones)."""

    def __init__(
        self,
        space: Any,
        costs: CostModel,
        seed: int,
        n_trials: int,
        options: EvolutionOptions,
        capacity: int,
    ) -> None:
        super().__init__(space)
        self.costs = costs
        self.options = options
        self.n_init = options.n_init or max(8, n_trials // 3)
        self.batch = max(options.batch, capacity)  # enough to keep every worker busy
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.queue: list[Candidate] = []

    def ask(self, study: optuna.Study, busy: set[str]) -> tuple[Trial, Candidate]:
        if not self.queue:
            self.queue = self._plan(study, busy)
        study.enqueue_trial(self.space.values(self.queue.pop(0)))
        return super().ask(study, busy)

    def _plan(self, study: optuna.Study, busy: set[str]) -> list[Candidate]:
        done = [
            (Candidate.from_json(t.user_attrs["candidate"]), t.values[0])
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        ]
        seen = busy | {c.key() for c, _ in done}
        batch = self.batch
        picks: list[Candidate] = []
        if len(done) + len(busy) >= self.n_init and len(done) >= 2:
            X = candidate_features(self.space, [c for c, _ in done])
            predictor = AccuracyPredictor(self.options.predictor, seed=self.seed)
            predictor.fit(X, np.array([a for _, a in done]))
            best = sorted(done, key=lambda ca: -ca[1])[: self.options.population // 4]
            population = evolve(
                self.space,
                lambda cs: predictor.predict(candidate_features(self.space, cs)),
                self.costs.feasible_mask,
                self.rng,
                seeds=[c for c, _ in best],
                population=self.options.population,
                generations=self.options.generations,
                mutate_prob=self.options.mutate_prob,
            )
            picks = [c for c, _ in population if c.key() not in seen][:batch]
        if not picks:  # warm-up, or evolution found nothing new: random feasible candidates
            make = partial(self.space.sample, self.rng)
            fresh = feasible_samples(make, 4 * batch, self.costs.feasible_mask)
            picks = _unique([c for c in fresh if c.key() not in seen])[:batch]
        return picks or [self.space.sample(self.rng)]  # none feasible: screened out as such


# ------------------------------------------------------------------------------ driving


class _LocalExecutor:
    """Evaluates in this process, one at a time."""

    capacity = 1

    def __init__(self, evaluate_fn: EvaluateFn) -> None:
        self.evaluate_fn = evaluate_fn
        self.results: dict[int, float | BaseException] = {}
        self.handles = itertools.count()

    def submit(self, candidate: Candidate) -> int:
        handle = next(self.handles)
        try:
            self.results[handle] = float(self.evaluate_fn(candidate))
        except Exception as err:
            self.results[handle] = err
        return handle

    def wait(self, handles: list[int]) -> list[tuple[int, float | BaseException]]:
        return [(h, self.results.pop(h)) for h in handles]

    def cancel(self, handles: list[int]) -> None:
        for h in handles:
            self.results.pop(h, None)

    def close(self) -> None:
        pass


def _executor(
    backend: str, evaluate_fn: EvaluateFn, workers: int, address: str | None, retries: int
) -> Any:
    if backend == "local":
        return _LocalExecutor(evaluate_fn)
    from autocomp.search.ray_backend import RayExecutor

    try:
        return RayExecutor(evaluate_fn, workers=workers, address=address, max_retries=retries)
    except ImportError as err:
        raise AutocompError(
            f"backend 'ray' needs Ray: pip install 'autocomp[ray]' ({err})"
        ) from None


class _Driver:
    """Screens proposals against the budget, keeps the executor busy, records every outcome."""

    def __init__(
        self,
        study: optuna.Study,
        proposer: _Proposer,
        costs: CostModel,
        executor: Any,
        sampler: str,
        tradeoff: str,
        measure_every: int,
    ) -> None:
        self.study = study
        self.proposer = proposer
        self.costs = costs
        self.executor = executor
        self.multi = sampler == "nsga2"
        self.tradeoff = tradeoff
        self.measure_every = measure_every
        self.done = {
            Candidate.from_json(t.user_attrs["candidate"]).key(): t.values[0]
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        }

    def run(self, n_trials: int, max_proposals: int, progress: bool) -> str | None:
        """Evaluate until the study holds ``n_trials`` COMPLETE trials; a note if proposals ran
        out first."""
        pending: dict[Any, tuple[Trial, Candidate, dict[str, float]]] = {}
        proposals = 0
        bar = tqdm(
            total=n_trials,
            initial=min(len(self.done), n_trials),
            desc="search",
            unit="eval",
            disable=not progress,
        )
        try:
            while len(self.done) < n_trials:
                busy = {c.key() for _, c, _ in pending.values()}
                while (
                    len(pending) < self.executor.capacity
                    and len(self.done) + len(pending) < n_trials
                    and proposals < max_proposals
                ):
                    proposals += 1
                    trial, candidate = self.proposer.ask(self.study, busy)
                    row = self._screen(trial, candidate, busy)
                    if row is not None:
                        pending[self.executor.submit(candidate)] = (trial, candidate, row)
                        busy.add(candidate.key())
                if not pending:
                    break
                for handle, result in self.executor.wait(list(pending)):
                    trial, candidate, row = pending.pop(handle)
                    if isinstance(result, BaseException):
                        trial.set_user_attr("error", f"{type(result).__name__}: {result}")
                        self.study.tell(trial, state=TrialState.FAIL)
                        raise result
                    trial.set_user_attr("status", "evaluated")
                    values = [result, _tradeoff(row, self.tradeoff)] if self.multi else result
                    self.study.tell(trial, values)
                    self.done[candidate.key()] = result
                    bar.update(1)
                    bar.set_postfix(best=f"{max(self.done.values()):.4f}")
        except BaseException:
            self.executor.cancel(list(pending))
            for trial, _, _ in pending.values():
                self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        finally:
            bar.close()
        if len(self.done) < n_trials:
            return (
                f"stopped after {proposals} proposals with {len(self.done)} of {n_trials} "
                "evaluations: the budget leaves few feasible candidates"
            )
        return None

    def _screen(
        self, trial: Trial, candidate: Candidate, busy: set[str]
    ) -> dict[str, float] | None:
        """Record the candidate and its costs; PRUNE it (free) when it is a duplicate or misses
        the budget. Returns its costs when it deserves an evaluation."""
        row = self.costs.costs([candidate])[0]
        key = candidate.key()
        trial.set_user_attr("candidate", candidate.to_json())
        trial.set_user_attr("cost", {k: row[k] for k in EXACT})
        if "latency_predicted_ms" in row:
            trial.set_user_attr("latency_predicted_ms", row["latency_predicted_ms"])
        if key in self.done or key in busy:
            status = "duplicate"
            if key in self.done and not self.multi:  # tell TPE what this candidate scored
                trial.report(self.done[key], 0)
        else:
            if self.costs.feasible(row) and self._measure_turn(trial.number):
                row["latency_measured_ms"] = self.costs.measure(candidate)
                trial.set_user_attr("latency_measured_ms", row["latency_measured_ms"])
            status = "evaluating" if self.costs.feasible(row) else "infeasible"
        for term, value in self.costs.constraints(row).items():
            trial.set_constraint(term, value)
        if status == "evaluating":
            return row
        trial.set_user_attr("status", status)
        self.study.tell(trial, state=TrialState.PRUNED)
        return None

    def _measure_turn(self, number: int) -> bool:
        if self.costs.measure_fn is None:
            return False
        if self.costs.latency_fn is None:
            return True
        return bool(self.measure_every) and number % self.measure_every == 0


def _tradeoff(row: dict[str, float], tradeoff: str) -> float:
    value = latency(row) if tradeoff == "latency_ms" else row["flops"]
    assert value is not None
    return float(value)


# ------------------------------------------------------------------------------- results


def record(trial: FrozenTrial) -> dict[str, Any]:
    """One trial as a JSON-ready dict (the candidate as a dict; accuracy None unless evaluated)."""
    attrs = trial.user_attrs
    cost = {**attrs.get("cost", {}), **{k: attrs[k] for k in LATENCIES if k in attrs}}
    text = trial.user_attrs.get("candidate")
    return {
        "number": trial.number,
        "state": trial.state.name,
        "status": trial.user_attrs.get("status"),
        "accuracy": trial.values[0] if trial.state == TrialState.COMPLETE else None,
        **cost,
        "latency_ms": latency(cost),
        "constraints": trial.constraints,
        "candidate": json.loads(text) if text else None,
    }


def pareto_front(records: list[dict[str, Any]], tradeoff: str) -> list[dict[str, Any]]:
    """Evaluated records no other beats on both accuracy (higher) and ``tradeoff`` (lower),
    cheapest first."""
    rows = sorted(
        (r for r in records if r["accuracy"] is not None and r.get(tradeoff) is not None),
        key=lambda r: (r[tradeoff], -r["accuracy"]),
    )
    front: list[dict[str, Any]] = []
    for r in rows:
        if not front or r["accuracy"] > front[-1]["accuracy"]:
            front.append(r)
    return front


def _result(
    study: optuna.Study,
    url: str,
    tradeoff: str,
    rerank_fn: EvaluateFn | None,
    top_k: int,
    notes: list[str],
) -> SearchResult:
    trials = study.get_trials(deepcopy=False)
    records = [record(t) for t in trials]
    # COMPLETE trials passed every budget term at screening; checking again guards shared studies.
    feasible = [
        r
        for r in records
        if r["state"] == "COMPLETE" and all(v <= 0 for v in r["constraints"].values())
    ]
    if not feasible:
        raise AutocompError(
            f"no candidate meeting the budget was evaluated in study {study.study_name!r} ({url}) "
            f"after {len(records)} proposals; loosen the budget or allow more proposals"
        )
    ranked = sorted(feasible, key=lambda r: -r["accuracy"])
    best = ranked[0]
    if rerank_fn is not None:
        scores = dict(study.user_attrs.get("rerank", {}))
        for r in ranked[:top_k]:
            if str(r["number"]) not in scores:
                scores[str(r["number"])] = float(rerank_fn(Candidate.from_dict(r["candidate"])))
                study.set_user_attr("rerank", scores)
        for r in ranked[:top_k]:
            r["rerank_accuracy"] = scores[str(r["number"])]
        best = max(ranked[:top_k], key=lambda r: r["rerank_accuracy"])
    return SearchResult(
        best=Candidate.from_dict(best["candidate"]),
        best_metrics=best,
        pareto=pareto_front(feasible, tradeoff),
        trials=records,
        study_name=study.study_name,
        storage_url=url,
        n_evaluated=len(feasible),
        notes=notes,
    )


def _unique(candidates: list[Candidate]) -> list[Candidate]:
    return list({c.key(): c for c in candidates}.values())


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every trial at INFO; the progress bar says enough."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)
