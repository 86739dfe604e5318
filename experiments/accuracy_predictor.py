"""How well the accuracy predictor ranks candidates it has not seen (target: Kendall τ ≥ 0.8).

Random candidates of the mbv3-digits space (see search_setup.py) are scored directly — supernet
weights, BN recalibration on training-split images, accuracy on the validation split — and each
predictor kind is fitted on the first n and judged by Kendall τ against the direct scores of the
held-out rest. Also printed: the measurement floor (the same candidates scored with a different BN
calibration subset, i.e. how well direct evaluation agrees with itself) and a MACs-only baseline.

    nice -n 5 python experiments/accuracy_predictor.py [--candidates 400] [--held-out 100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from search_setup import setting

from autocomp.search import AccuracyPredictor, kendall_tau
from autocomp.search.accuracy import KINDS
from autocomp.supernet.train import calibration_batches, evaluate_subnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=400)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    space, data, evaluate = setting(progress=False)
    rng = np.random.default_rng(args.seed)
    candidates = list(
        {c.key(): c for c in (space.sample(rng) for _ in range(args.candidates))}.values()
    )
    start = time.perf_counter()
    y = np.array([evaluate(c) for c in candidates])
    print(
        f"{len(candidates)} candidates scored directly ({evaluate.calls} new evaluations, "
        f"{time.perf_counter() - start:.0f} s); accuracy min {y.min():.4f} median "
        f"{np.median(y):.4f} max {y.max():.4f}, {len(np.unique(y))} distinct values"
    )
    X = space.encode(candidates)
    test = slice(len(candidates) - args.held_out, None)
    X_test, y_test = X[test], y[test]

    # Floor: the held-out candidates re-scored with another BN calibration subset.
    other_bn = calibration_batches(data.x_train, count=512, batch_size=128, seed=1)
    again = [
        evaluate_subnet(evaluate.supernet, c, other_bn, evaluate.split) for c in candidates[test]
    ]
    macs = np.array([space.cost(c).macs for c in candidates[test]])
    print(f"\nheld-out: {args.held_out} candidates")
    print(
        f"  direct evaluation vs itself (another BN subset): τ = {kendall_tau(again, y_test):.3f}"
    )
    print(f"  MACs alone:                                     τ = {kendall_tau(macs, y_test):.3f}")

    sizes = [n for n in (25, 50, 100, 200, 300) if n <= len(candidates) - args.held_out]
    print(f"\n{'kind':<6}" + "".join(f"{f'n={n}':>9}" for n in sizes) + f"{'fit s':>8}")
    for kind in KINDS:
        taus, fit_s = [], 0.0
        for n in sizes:
            t = time.perf_counter()
            predictor = AccuracyPredictor(kind, seed=args.seed).fit(X[:n], y[:n])
            fit_s = time.perf_counter() - t
            taus.append(predictor.score(X_test, y_test))
        print(f"{kind:<6}" + "".join(f"{tau:>9.3f}" for tau in taus) + f"{fit_s:>8.2f}")


if __name__ == "__main__":
    main()
