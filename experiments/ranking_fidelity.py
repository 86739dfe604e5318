"""Acceptance 5 of issue 4: does the supernet rank subnets as training them would?

For each dataset: train the ``mbv3`` supernet (default ``TrainConfig``) on a fit split carved
from the training split, pick subnets spread over the space's cost range (quantiles of the MACs
of random candidates, int8 layers included), and score each twice on the held-out validation
split: with inherited weights after BN recalibration (what the search sees), and after extracting
it and finetuning it standalone for a few epochs (quantization-aware for its int8 layers). Prints
the table and Kendall's τ between the two columns; exits non-zero when a τ is below 0.6.

    python experiments/make_hard_digits.py   # once: writes experiments/data/digits_hard.npz
    python experiments/ranking_fidelity.py [--data digits npz:experiments/data/digits_hard.npz]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.stats import kendalltau

from autocomp import data
from autocomp.data import ImageDataset
from autocomp.spaces import Candidate, get_space
from autocomp.supernet.train import (
    TrainConfig,
    calibration_batches,
    distill_loss,
    evaluate,
    evaluate_subnet,
    make_optimizer,
    random_shifts,
    train_supernet,
    view,
    warmup_cosine,
)

HARD = "npz:experiments/data/digits_hard.npz"
MIN_TAU = 0.6


def spread(space, n: int, rng: np.random.Generator, pool: int = 400) -> list[Candidate]:
    """``n`` random candidates at evenly spaced quantiles (5 %–95 %) of their MACs."""
    candidates = sorted((space.sample(rng) for _ in range(pool)), key=lambda c: space.cost(c).macs)
    return [candidates[int(q * (pool - 1))] for q in np.linspace(0.05, 0.95, n)]


def finetune(model: torch.nn.Module, dataset: ImageDataset, resolution: int, epochs: int) -> None:
    """A short standalone finetune on the labels (AdamW, warm-up + cosine, random shifts)."""
    torch.manual_seed(0)
    x, y = torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train)
    batch = 32
    steps = len(y) // batch
    optimizer = make_optimizer(model, "adamw", 1e-3, 5e-5)
    scheduler = warmup_cosine(optimizer, steps * epochs, steps // 2)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(y))[: steps * batch].view(steps, batch):
            xb = view(x[index], resolution, random_shifts(batch, 0.1))
            distill_loss(model(xb), y[index], label_smoothing=0.1).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()


def fidelity(spec: str, args: argparse.Namespace) -> float:
    dataset = data.load(spec).validation_split(0.2, seed=0)  # test = the validation split
    held_out = (dataset.x_test, dataset.y_test)
    space = get_space(
        args.space, num_classes=dataset.num_classes, in_channels=dataset.input_shape[0]
    )
    supernet = space.supernet()
    name = spec.rsplit("/", 1)[-1].removesuffix(".npz").replace(":", "-")
    start = time.perf_counter()
    train_supernet(
        supernet,
        space,
        dataset,
        TrainConfig(**{"num_threads": args.threads, **args.overrides}),
        checkpoint=args.checkpoints / f"{name}.pt",
    )
    print(f"\n{spec}: supernet trained (or loaded) in {time.perf_counter() - start:.0f} s")
    torch.set_num_threads(args.threads)
    batches = calibration_batches(dataset.x_train)
    rows = []
    for candidate in spread(space, args.subnets, np.random.default_rng(0)):
        inherited = evaluate_subnet(supernet, candidate, batches, held_out)
        model = space.build(candidate, supernet=supernet)  # recalibrated, int8 layers fake-quant
        finetune(model, dataset, candidate.resolution, args.finetune_epochs)
        tuned = evaluate(model, held_out, candidate.resolution)
        int8 = sum(b == 8 for b in candidate.bits.values())
        macs = space.cost(candidate).macs / 1e6
        rows.append((candidate.key()[:8], candidate.resolution, macs, int8, inherited, tuned))
        print(
            f"  {rows[-1][0]}  res {candidate.resolution:>3}  {macs:>6.1f} MMACs  "
            f"{int8:>2}/{len(candidate.bits)} int8  inherited {inherited:6.2%}  "
            f"finetuned {tuned:6.2%}",
            flush=True,
        )
    tau = kendalltau([r[4] for r in rows], [r[5] for r in rows]).statistic
    print(f"{spec}: Kendall tau = {tau:.3f} over {len(rows)} subnets")
    return float(tau)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits", HARD])
    parser.add_argument("--subnets", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoints", type=Path, default=Path("runs/ranking_fidelity"))
    parser.add_argument("--space", default="mbv3")
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, key=value")
    args = parser.parse_args()
    args.overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    taus = {spec: fidelity(spec, args) for spec in args.data}
    print()
    for spec, tau in taus.items():
        print(f"{spec:<45} tau {tau:.3f}  {'PASS' if tau >= MIN_TAU else 'FAIL'}")
    return 0 if all(t >= MIN_TAU for t in taus.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
