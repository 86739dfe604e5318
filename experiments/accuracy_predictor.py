"""How well the accuracy predictor ranks candidates it has not seen (target: Kendall τ ≥ 0.8).

Random candidates of the mbv3-digits space (see search_setup.py) are scored directly — supernet
weights, BN recalibration on training-split images, the validation split — image by image: top-1
``accuracy`` (what ``evaluate_subnet`` returns and the search maximises) and, as candidate
less noisy targets, ``soft_accuracy`` (mean softmax probability of the true class) and the
negative cross-entropy. For each, every predictor kind is fitted on the first n candidates and
judged by Kendall τ against the direct scores of the held-out rest. The features are
``candidate_features``; ``gbdt`` on ``encode()`` alone is printed too.

Also printed per target, for the held-out candidates:

- the split-half reliability: each candidate scored on two random halves of the validation images
  (copies of one source digit stay together), averaged over 50 splits. From it, under a bivariate
  normal model (τ = 2/π·asin r, Spearman–Brown for the full set), the τ that an oracle of each
  candidate's *expected* score would reach against the direct score: no predictor can expect to
  beat it. On digits_hard also the ceiling with fewer copies of the validation digits, and the
  one extrapolated to unlimited copies;
- how well the target on one half ranks the candidates by top-1 accuracy on the other half: a
  less noisy target is a better thing for the search to maximise only if this beats accuracy's
  own split-half τ;
- MACs alone;
- ``gbdt`` at the largest n on ``SPLITS`` random held-out sets: mean and spread of τ;
- on digits_hard, ``gbdt`` at the largest n trained on scores from only the first 1, 2, …
  copies: how much cleaner training labels alone buy;
- with ``--bn-floor``, the same candidates scored with another BN calibration subset.

Per-image results are cached beside the supernet (``per-image-*.npz``), so re-runs only refit.

    nice -n 10 python experiments/accuracy_predictor.py [--candidates 400] [--held-out 100]

The README's τ ≥ 0.8 is ``--candidates 3300``: 2 h of scoring on one core, after which the cache
makes re-runs refit only.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from search_setup import RUN, setting, validation_copies

from autocomp.search import AccuracyPredictor, candidate_features, kendall_tau
from autocomp.search.accuracy import KINDS
from autocomp.supernet.train import calibration_batches, subnet_logits

#: Random held-out sets ``gbdt`` at the largest n is also judged on: one set's τ moves by ~±0.05.
SPLITS = 5
#: Per-image values whose mean over the validation images is each score.
TARGETS = ("accuracy", "soft_accuracy", "-cross-entropy")


def per_image(evaluate, candidate, bn) -> np.ndarray:
    """(3, images) float32: correct (0/1), probability and log-probability of the true class, for
    ``candidate`` with BN recalibrated on ``bn``; the first row is what ``evaluate_subnet``
    averages, from the same forward pass (``subnet_logits``)."""
    x, y = (torch.as_tensor(a) for a in evaluate.split)
    logits = subnet_logits(evaluate.supernet, candidate, bn, x).double()
    logp = logits.log_softmax(1).gather(1, y[:, None])[:, 0]
    return torch.stack([(logits.argmax(1) == y).double(), logp.exp(), logp]).float().numpy()


def scored(evaluate, candidates, bn, path) -> np.ndarray:
    """(candidates, 3, images) per-image results, cached in ``path`` by candidate key."""
    cache = dict(np.load(path)) if path.exists() else {}
    todo = [c for c in candidates if c.key() not in cache]
    for done, candidate in enumerate(todo, 1):
        cache[candidate.key()] = per_image(evaluate, candidate, bn)
        if done % 25 == 0 or done == len(todo):
            np.savez(path.with_suffix(".tmp.npz"), **cache)
            os.replace(path.with_suffix(".tmp.npz"), path)
    return np.stack([cache[c.key()] for c in candidates])


def split_half(values: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Mean τ between the scores on two halves of the images (split by group), and the
    reliability (share of the score's variance across candidates that is not noise) it implies
    for the full set (see the module docstring)."""
    tau = float(np.mean([kendall_tau(a.mean(1), b.mean(1)) for a, b in halves(values, groups)]))
    r_half = np.sin(np.pi / 2 * tau)
    return tau, float(2 * r_half / (1 + r_half))


def ceiling(reliability: float) -> float:
    """τ of an oracle of the expected score against a score of this reliability."""
    return float(2 / np.pi * np.arcsin(np.sqrt(reliability)))


def by_copies(values: np.ndarray, groups: np.ndarray, copies: int) -> tuple[list[float], float]:
    """Ceilings with the first 1, 2, … ``copies`` copies of each validation digit, and the one
    with unlimited copies of these digits: 1/reliability − 1 = d + c/m fitted over the m."""
    per = len(groups) // copies
    ms = np.arange(1, copies + 1)
    reliabilities = [split_half(values[:, : m * per], groups[: m * per])[1] for m in ms]
    d, _ = np.linalg.lstsq(
        np.stack([np.ones(len(ms)), 1 / ms], 1), 1 / np.array(reliabilities) - 1, rcond=None
    )[0]
    return [ceiling(r) for r in reliabilities], ceiling(1 / (1 + max(d, 0.0)))


def halves(values: np.ndarray, groups: np.ndarray, splits: int = 50, seed: int = 0):
    """``splits`` random (first half, second half) column splits of ``values``, by group."""
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    for _ in range(splits):
        half = np.isin(groups, rng.permutation(ids)[: len(ids) // 2])
        yield values[..., half], values[..., ~half]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=400)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bn-floor", action="store_true", help="re-score with another BN subset")
    args = parser.parse_args()
    torch.set_num_threads(1)

    space, data, evaluate = setting(progress=False)
    rng = np.random.default_rng(args.seed)
    candidates = list(
        {c.key(): c for c in (space.sample(rng) for _ in range(args.candidates))}.values()
    )
    copies = validation_copies()
    test = slice(len(candidates) - args.held_out, None)
    start, load = time.perf_counter(), os.getloadavg()[0]
    path = RUN / f"per-image-{copies}copies.npz"
    scored(evaluate, candidates[test], evaluate.bn, path)  # first: what an interrupted run judges
    images = scored(evaluate, candidates, evaluate.bn, path)
    scores = images.mean(2, dtype=np.float64)  # (candidates, target)
    cached = [evaluate.cache.get(c.key()) for c in candidates]
    agree = sum(a is not None and a == s for a, s in zip(cached, scores[:, 0], strict=True))
    print(
        f"{len(candidates)} candidates scored directly on {len(evaluate.split[1])} validation "
        f"images ({copies} copies of {len(np.unique(evaluate.groups))}), "
        f"{time.perf_counter() - start:.0f} s, load average {load:.1f} → "
        f"{os.getloadavg()[0]:.1f}; accuracy equal to the search cache's for "
        f"{agree} of {sum(a is not None for a in cached)} cached"
    )
    for t, name in enumerate(TARGETS):
        y = scores[:, t]
        print(
            f"  {name:<15} min {y.min():.4f} median {np.median(y):.4f} max {y.max():.4f}, "
            f"{len(np.unique(y))} distinct values"
        )

    X = candidate_features(space, candidates)
    E = space.encode(candidates)
    held = images[test]
    macs = np.array([space.cost(c).macs for c in candidates[test]])
    other = None
    if args.bn_floor:
        other_bn = calibration_batches(data.x_train, count=512, batch_size=128, seed=1)
        other = np.stack([per_image(evaluate, c, other_bn) for c in candidates[test]])
        other = other.mean(2, dtype=np.float64)
    sizes = [
        n
        for n in (25, 50, 100, 200, 300, 500, 800, 1600, 3200)
        if n <= len(candidates) - args.held_out
    ]
    rows = [(kind, kind, X) for kind in KINDS] + [("gbdt encode()", "gbdt", E)]
    for t, name in enumerate(TARGETS):
        y, y_test = scores[:, t], scores[test, t]
        half_tau, reliability = split_half(held[:, t], evaluate.groups)
        pairs = halves(held, evaluate.groups)
        vs_acc = np.mean([kendall_tau(a[:, t].mean(1), b[:, 0].mean(1)) for a, b in pairs])
        print(f"\ntarget {name}, held-out: {args.held_out} candidates")
        lines = [
            ("validation split-half reliability (50 splits)", half_tau),
            ("ceiling: oracle of expected score vs direct score", ceiling(reliability)),
            ("this score on one half vs accuracy on the other", vs_acc),
            ("MACs alone", kendall_tau(macs, y_test)),
        ]
        if other is not None:
            floor = kendall_tau(other[:, t], y_test)
            lines.insert(0, ("direct evaluation vs itself (another BN subset)", floor))
        for label, tau in lines:
            print(f"  {label + ':':<54}τ = {tau:.3f}")
        if copies > 1:
            ceilings, unlimited = by_copies(held[:, t], evaluate.groups, copies)
            print(
                f"  ceiling with 1..{copies} copies: "
                + " / ".join(f"{c:.3f}" for c in ceilings)
                + f"; unlimited copies (extrapolated): {unlimited:.3f}"
            )
        print(f"{'kind':<16}" + "".join(f"{f'n={n}':>9}" for n in sizes) + f"{'fit s':>8}")
        for label, kind, features in rows:
            taus, fit_s = [], 0.0
            for n in sizes:
                t0 = time.perf_counter()
                predictor = AccuracyPredictor(kind, seed=args.seed).fit(features[:n], y[:n])
                fit_s = time.perf_counter() - t0
                taus.append(predictor.score(features[test], y_test))
            print(f"{label:<16}" + "".join(f"{tau:>9.3f}" for tau in taus) + f"{fit_s:>8.2f}")
        n, taus = sizes[-1], []
        for split in range(SPLITS):  # the fixed held-out set is one draw of many
            order = np.random.default_rng(split).permutation(len(candidates))
            rest, fit = order[: args.held_out], order[args.held_out : args.held_out + n]
            predictor = AccuracyPredictor("gbdt", seed=args.seed).fit(X[fit], y[fit])
            taus.append(predictor.score(X[rest], y[rest]))
        print(
            f"gbdt, n={n}, {SPLITS} random held-out sets of {args.held_out}: "
            f"τ = {np.mean(taus):.3f} ± {np.std(taus):.3f} (min {min(taus):.3f})"
        )
        if copies > 1:  # how much cleaner training labels alone would give
            n, per = sizes[-1], len(evaluate.groups) // copies
            taus = [
                AccuracyPredictor("gbdt", seed=args.seed)
                .fit(X[:n], images[:n, t, : m * per].mean(1, dtype=np.float64))
                .score(X[test], y_test)
                for m in range(1, copies + 1)
            ]
            print(
                f"gbdt, n={n}, trained on the scores from 1..{copies} copies: "
                + " / ".join(f"{tau:.3f}" for tau in taus)
            )


if __name__ == "__main__":
    main()
