"""How self-consistent is a latency dataset? The kernel predictor cross-validated on it.

Each model of a dataset is predicted by a kernel predictor fitted on the others (5 folds), so the
truths are of the dataset's own hour and estimator: what is left is the predictor's error plus
the measurement's noise. Given several datasets, only the models they share are used, so two
measurements of the same models (e.g. an old and a new protocol) compare like with like.

    python experiments/dataset_consistency.py A.jsonl [B.jsonl ...]

The shipped Intel Xeon dataset before and after 2026-12-06 (the same generator seed):

    git show 4d0efd2:latency_predictors/<intel profile>/measurements.jsonl > /tmp/old.jsonl
    python experiments/dataset_consistency.py /tmp/old.jsonl \\
        latency_predictors/<intel profile>/measurements.jsonl
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from autocomp.latency.dataset import read_records
from autocomp.latency.fit import cross_validated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("datasets", nargs="+", help="dataset JSONL files")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    sets = [read_records(path) for path in args.datasets]
    shared = set.intersection(*({r["id"] for r in records} for records in sets))
    print(f"{len(shared)} models in every dataset")
    for path, records in zip(args.datasets, sets, strict=True):
        records = [r for r in records if r["id"] in shared]
        m = cross_validated(records)
        sessions = [
            r["session_medians_ms"] for r in records if len(r.get("session_medians_ms", [])) >= 2
        ]
        agree = (
            np.mean([abs(s[0] / s[1] - 1) <= 0.1 for s in sessions]) * 100 if sessions else np.nan
        )
        print(
            f"{path}: within ±5% {m['within_5_pct']:.1f}%, ±10% {m['within_10_pct']:.1f}%, "
            f"MAPE {m['mape_pct']:.2f}%, τ {m['kendall_tau']:.3f}; a model's two sessions within "
            f"±10% of each other: {agree:.1f}%"
        )


if __name__ == "__main__":
    main()
