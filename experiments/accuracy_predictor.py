"""How well the accuracy predictor ranks candidates it has not seen (target: Kendall τ ≥ 0.8).

Random candidates of the mbv3-digits space (see search_setup.py) are scored directly — supernet
weights, BN recalibration on training-split images, accuracy on the validation split — and each
predictor kind is fitted on the first n and judged by Kendall τ against the direct scores of the
held-out rest. The features are ``candidate_features`` (``encode()`` plus per-layer channels and
MACs); ``gbdt`` on ``encode()`` alone is printed too, for comparison.

Also printed, for the held-out candidates, what limits any predictor:

- the BN floor: the same candidates scored with another BN calibration subset;
- the split-half reliability: each candidate scored on two random halves of the validation images
  (copies of one source digit stay together), averaged over 50 splits. From it, under a bivariate
  normal model (τ = 2/π·asin r, Spearman–Brown for the full set), the τ that an oracle of each
  candidate's *expected* accuracy would reach against the direct score: no predictor can expect
  to beat it;
- MACs alone.

    nice -n 5 python experiments/accuracy_predictor.py [--candidates 400] [--held-out 100]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from search_setup import setting, validation_copies

from autocomp.search import AccuracyPredictor, candidate_features, kendall_tau
from autocomp.search.accuracy import KINDS
from autocomp.supernet.train import calibration_batches, evaluate_subnet, view


def correct_per_image(evaluate, candidate, bn) -> np.ndarray:
    """0/1 per validation image for ``candidate`` with BN recalibrated on ``bn``: the same
    procedure as ``evaluate_subnet`` (which sets the candidate up), keeping every image's result."""
    x, y = (torch.as_tensor(a) for a in evaluate.split)
    supernet = evaluate.supernet
    evaluate_subnet(supernet, candidate, bn, (x[:1], y[:1]))  # activate, recalibrate
    supernet.eval()
    with torch.no_grad():
        hits = [
            supernet(view(xb, candidate.resolution)).argmax(1) == yb
            for xb, yb in zip(x.split(256), y.split(256), strict=True)
        ]
    return torch.cat(hits).numpy().astype(np.float64)


def split_half(correct: np.ndarray, groups: np.ndarray, splits: int = 50) -> tuple[float, float]:
    """Mean τ between the accuracies on two halves of the images (split by group), and the
    oracle ceiling it implies for the full set (see the module docstring)."""
    rng = np.random.default_rng(0)
    ids = np.unique(groups)
    taus = []
    for _ in range(splits):
        half = np.isin(groups, rng.permutation(ids)[: len(ids) // 2])
        taus.append(kendall_tau(correct[:, half].mean(1), correct[:, ~half].mean(1)))
    tau = float(np.mean(taus))
    r_half = np.sin(np.pi / 2 * tau)
    reliability = 2 * r_half / (1 + r_half)
    return tau, float(2 / np.pi * np.arcsin(np.sqrt(reliability)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=400)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    space, data, evaluate = setting(progress=False)
    rng = np.random.default_rng(args.seed)
    candidates = list(
        {c.key(): c for c in (space.sample(rng) for _ in range(args.candidates))}.values()
    )
    start, load = time.perf_counter(), os.getloadavg()[0]
    y = np.array([evaluate(c) for c in candidates])
    print(
        f"{len(candidates)} candidates scored directly on {len(evaluate.split[1])} validation "
        f"images ({validation_copies()} copies of {len(np.unique(evaluate.groups))}); "
        f"{evaluate.calls} new evaluations, {time.perf_counter() - start:.0f} s, load average "
        f"{load:.1f} → {os.getloadavg()[0]:.1f}; accuracy min {y.min():.4f} median "
        f"{np.median(y):.4f} max {y.max():.4f}, {len(np.unique(y))} distinct values"
    )
    X = candidate_features(space, candidates)
    E = space.encode(candidates)
    test = slice(len(candidates) - args.held_out, None)
    y_test = y[test]

    # What limits any predictor: the held-out candidates re-scored with another BN subset, image
    # by image, for the split-half reliability of the validation set.
    other_bn = calibration_batches(data.x_train, count=512, batch_size=128, seed=1)
    correct = np.stack([correct_per_image(evaluate, c, other_bn) for c in candidates[test]])
    half_tau, ceiling = split_half(correct, evaluate.groups)
    macs = np.array([space.cost(c).macs for c in candidates[test]])
    print(f"\nheld-out: {args.held_out} candidates")
    for label, tau in (
        ("direct evaluation vs itself (another BN subset)", kendall_tau(correct.mean(1), y_test)),
        ("validation split-half reliability (50 splits)", half_tau),
        ("ceiling: oracle of expected accuracy vs direct score", ceiling),
        ("MACs alone", kendall_tau(macs, y_test)),
    ):
        print(f"  {label + ':':<54}τ = {tau:.3f}")

    sizes = [n for n in (25, 50, 100, 200, 300, 500, 800) if n <= len(candidates) - args.held_out]
    print(f"\n{'kind':<14}" + "".join(f"{f'n={n}':>9}" for n in sizes) + f"{'fit s':>8}")
    rows = [(kind, kind, X) for kind in KINDS] + [("gbdt encode()", "gbdt", E)]
    for label, kind, features in rows:
        taus, fit_s = [], 0.0
        for n in sizes:
            t = time.perf_counter()
            predictor = AccuracyPredictor(kind, seed=args.seed).fit(features[:n], y[:n])
            fit_s = time.perf_counter() - t
            taus.append(predictor.score(features[test], y_test))
        print(f"{label:<14}" + "".join(f"{tau:>9.3f}" for tau in taus) + f"{fit_s:>8.2f}")


if __name__ == "__main__":
    main()
