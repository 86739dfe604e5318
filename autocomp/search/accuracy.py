"""Accuracy predictor: ranks candidates from their ``encode()`` vector without evaluating them.

As in OFA and APQ, a regressor fitted on the direct supernet evaluations a search has already paid
for scores thousands of candidates per second: it is the fitness of the evolutionary search and
the pre-screen that decides which candidates deserve a direct evaluation. What matters is ranking,
so it is judged by Kendall τ (experiments/accuracy_predictor.py compares the kinds). It is refitted
from the study's trials whenever needed, so it is never persisted and nothing is ever unpickled.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import kendalltau
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from autocomp.errors import AutocompError

KINDS = ("gbdt", "rf", "mlp")


class AccuracyPredictor:
    """scikit-learn-style regressor over ``space.encode`` vectors: ``fit(X, y)``, ``predict(X)``.

    ``kind``: ``"gbdt"`` (gradient-boosted trees), ``"rf"`` (random forest) or ``"mlp"``
    (standardised inputs, two hidden layers, as OFA's predictor). Deterministic for a ``seed``.
    """

    def __init__(self, kind: str = "rf", *, seed: int = 0) -> None:
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
        return GradientBoostingRegressor(
            n_estimators=300, learning_rate=0.05, max_depth=3, subsample=0.8, random_state=seed
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
