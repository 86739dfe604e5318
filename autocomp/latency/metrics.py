"""How good a latency predictor is, in the terms papers report (nn-Meter, LitePred, HELP)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import kendalltau

METRIC_KEYS = ("n", "within_5_pct", "within_10_pct", "rmse_ms", "mape_pct", "kendall_tau")
#: Folds of the cross-validations that judge a latency model on its own measurements.
FOLDS = 5


def latency_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """n, % of predictions within ±5% and ±10% of the truth, RMSE (ms), MAPE (%), Kendall τ.

    τ measures what a search needs most: whether the predictor ranks models correctly.
    """
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got {t.shape}, {p.shape}")
    if len(t) == 0:
        return {
            "n": 0,
            "within_5_pct": float("nan"),
            "within_10_pct": float("nan"),
            "rmse_ms": float("nan"),
            "mape_pct": float("nan"),
            "kendall_tau": float("nan"),
        }
    rel = np.abs(p - t) / t
    tau = float(kendalltau(t, p).statistic) if len(t) > 1 else float("nan")
    return {
        "n": len(t),
        "within_5_pct": float(100 * np.mean(rel <= 0.05)),
        "within_10_pct": float(100 * np.mean(rel <= 0.10)),
        "rmse_ms": float(np.sqrt(np.mean((p - t) ** 2))),
        "mape_pct": float(100 * np.mean(rel)),
        "kendall_tau": tau,
    }


def out_of_fold(
    n: int, fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray], seed: int = 0
) -> np.ndarray:
    """Each of ``n`` (≥ 2) measurements predicted once by a model fitted without it:
    ``fit_predict(fit, rest)`` fits on the indices ``fit`` and predicts those in ``rest``
    (:data:`FOLDS` folds of a seeded permutation)."""
    folds = np.random.default_rng(seed).permutation(n) % FOLDS
    predicted = np.empty(n, dtype=float)
    for k in np.unique(folds):
        fit, rest = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        predicted[rest] = fit_predict(fit, rest)
    return predicted
