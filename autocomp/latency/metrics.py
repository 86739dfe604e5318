"""How good a latency predictor is, in the terms papers report (nn-Meter, LitePred, HELP)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import kendalltau

METRIC_KEYS = ("n", "within_5_pct", "within_10_pct", "rmse_ms", "mape_pct", "kendall_tau")


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
