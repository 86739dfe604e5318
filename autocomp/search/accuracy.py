"""Accuracy predictor: ranks candidates from their features without evaluating them.

As in OFA and APQ, a regressor fitted on the direct supernet evaluations a search has already paid
for scores thousands of candidates per second: it is the fitness of the evolutionary search and
the pre-screen that decides which candidates deserve a direct evaluation. What matters is ranking,
so it is judged by Kendall τ (experiments/accuracy_predictor.py compares the kinds). It is refitted
from the study's trials whenever needed, so it is never persisted and nothing is ever unpickled.

Features (:func:`candidate_features`): the space's ``encode()`` vector, plus what a layer actually
keeps — log2 of every layer's output channels, the product of stage width, expand ratio and keep
ratio that no single choice shows — plus log2 MACs and parameters. On the mbv3-digits experiment
(fitted on 300 candidates, 100 held out) they raise the τ of gradient-boosted trees from 0.63
(``encode()`` alone) to 0.67, against an oracle ceiling of 0.85 set by the noise of the direct
score itself (top-1 accuracy on 1728 validation images); at that size per-stage aggregates,
other learning rates or an ensemble of seeds did not beat them in cross-validation.
More evaluations help slowly, about +0.03 per doubling: τ 0.76 / 0.78 / 0.81 at 800 / 1600 /
3200 training candidates on another 100 held out, and 0.806 ± 0.016 at 3200 over 5 random
held-out sets (``--candidates 3300``; ceiling 0.85). A histogram-binned booster ranked about as
well from many candidates (+0.004 at 3200) and worse from few (0.56 against 0.59 at 100); blends
with it, or predicted soft accuracy and cross-entropy (less noisy targets) stacked as features,
did not beat these trees in cross-validation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import kendalltau
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from autocomp.errors import AutocompError
from autocomp.spaces.candidate import Candidate

KINDS = ("gbdt", "rf", "mlp")


def candidate_features(space: Any, candidates: list[Candidate]) -> np.ndarray:
    """A (n, d) float64 matrix: ``space.encode`` columns, then log2 output channels of each layer
    the space can have (0 where the candidate lacks it), then log2 MACs and log2 parameters.

    A space without ``plan``/``largest``/``cost`` (the small protocol asks only for ``encode``)
    gets its ``encode`` columns alone.
    """
    encoded = np.asarray(space.encode(candidates), dtype=np.float64)
    if not all(hasattr(space, name) for name in ("plan", "largest", "cost")):
        return encoded
    layers = list(space.plan(space.largest()).layers)
    extra = np.zeros((len(candidates), len(layers) + 2))
    for row, candidate in enumerate(candidates):
        plan = space.plan(candidate)
        for col, name in enumerate(layers):
            spec = plan.layers.get(name)
            if spec is not None:
                extra[row, col] = np.log2(spec.cout)
        cost = space.cost(candidate)
        extra[row, -2:] = np.log2(max(cost.macs, 1)), np.log2(max(cost.params, 1))
    return np.hstack([encoded, extra])


class AccuracyPredictor:
    """scikit-learn-style regressor over candidate features: ``fit(X, y)``, ``predict(X)``.

    ``X`` is :func:`candidate_features` (or any fixed-width encoding, e.g. ``space.encode``).
    ``kind``: ``"gbdt"`` (gradient-boosted trees, the default: best held-out τ), ``"rf"`` (random
    forest) or ``"mlp"`` (standardised inputs, two hidden layers, as OFA's predictor).
    Deterministic for a ``seed``.
    """

    def __init__(self, kind: str = "gbdt", *, seed: int = 0) -> None:
        if kind not in KINDS:
            raise AutocompError(f"unknown accuracy predictor {kind!r}; use one of {KINDS}")
        self.kind = kind
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> AccuracyPredictor:
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64).reshape(-1)
        if len(X) != len(y) or len(y) < 2:
            raise ValueError(f"need at least 2 matching rows, got X {X.shape} and y {y.shape}")
        # Targets are standardised so that one set of hyper-parameters suits any accuracy range.
        self.mean_, self.scale_ = float(y.mean()), float(y.std()) or 1.0
        self.model_ = _make(self.kind, self.seed).fit(X, (y - self.mean_) / self.scale_)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        z = self.model_.predict(np.asarray(X, dtype=np.float64))
        return z * self.scale_ + self.mean_

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Kendall τ between predictions and ``y``: the ranking quality that search relies on."""
        return kendall_tau(self.predict(X), y)


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's τ-b (ties handled), 0 when either side is constant."""
    tau = kendalltau(np.asarray(a), np.asarray(b)).statistic
    return 0.0 if np.isnan(tau) else float(tau)


def _make(kind: str, seed: int):
    if kind == "gbdt":
        # Shallow trees, many small steps, a third of the features per split. Depth 3 (three-way
        # interactions, e.g. a stage's width with its expand and keep ratios) ranks as well as
        # depth 2 from a few hundred noisy labels (τ 0.59 / 0.69 at n = 100 / 300, both depths)
        # and better from more: 0.79 against 0.77 at 1600, 0.81 against 0.78 at 3200.
        return GradientBoostingRegressor(
            n_estimators=1000,
            learning_rate=0.02,
            max_depth=3,
            subsample=0.7,
            max_features=0.3,
            random_state=seed,
        )
    if kind == "rf":
        return RandomForestRegressor(
            n_estimators=100, max_features=0.5, min_samples_leaf=1, random_state=seed, n_jobs=1
        )
    return make_pipeline(
        StandardScaler(),
        MLPRegressor(
            hidden_layer_sizes=(64, 64),
            alpha=1e-3,
            learning_rate_init=1e-3,
            max_iter=1000,
            random_state=seed,
        ),
    )
