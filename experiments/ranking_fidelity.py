"""Acceptance 5 of issue 4: does the supernet rank subnets as training them would?

For each dataset, the supernet is trained as ``autocomp search`` trains it by default (space
``api.space_for``, config ``api.supernet_config``, data: the fit part of the stratified
validation split of the training split). Then ``--subnets`` random candidates graded from the
small end of the space to the large end (see ``spread``; int8 layers included) are each scored
twice on all held-out images (the test split and the validation part, which neither the supernet,
nor its BN recalibration, nor any finetune sees): with inherited weights after BN recalibration
(what the search sees), and after extracting the subnet and finetuning it standalone for a few
epochs on the fit part (quantization-aware for its int8 layers). Prints the table and Kendall's
τ-b between the two columns (also per split); writes the table as JSON beside the checkpoint;
exits non-zero when a held-out τ is below 0.6.

    python experiments/make_hard_digits.py   # once: writes experiments/data/digits_hard.npz
    nice -n 5 python experiments/ranking_fidelity.py [--data digits npz:PATH ...] [--subnets 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.stats import kendalltau

from autocomp import api, data
from autocomp.data import ImageDataset
from autocomp.spaces import Candidate, SearchSpace
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
CHECKPOINTS = Path("runs/ranking_fidelity")


def spread(space: SearchSpace, n: int, rng: np.random.Generator) -> list[Candidate]:
    """``n`` random candidates graded from the small end of the space to the large end.

    For the i-th, every choice's index (choices sorted) is drawn Binomial(count - 1, level_i),
    levels evenly spaced over [0.1, 0.9]: each is a random mix of choices (none is the smallest
    or the largest, which the sandwich rule trains directly), and together they cover the cost
    range that searches under different budgets explore. Uniformly random candidates would
    all sit mid-range (on digits 2-6 of 0.4-21 MMACs), where accuracies differ by less than the
    test split's noise. Sorted by MACs.
    """
    picked = []
    for level in np.linspace(0.1, 0.9, n):
        values = {}
        for p in space.params:
            choices = sorted(p.choices)
            values[p.name] = choices[rng.binomial(len(choices) - 1, level)]
        picked.append(space.from_values(values))
    return sorted(picked, key=lambda c: space.cost(c).macs)


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


def config_tag(config: TrainConfig) -> str:
    """A short hash of the settings that change the weights (not the thread count)."""
    settings = {k: v for k, v in config.to_dict().items() if k != "num_threads"}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def loads() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def fidelity(spec: str, args: argparse.Namespace) -> float:
    if spec == HARD and not Path(HARD.partition(":")[2]).exists():
        import make_hard_digits  # beside this script

        make_hard_digits.main()
    dataset = data.load(spec)
    fit = dataset.validation_split(0.2, seed=args.seed)  # what the product trains on
    # Held out from the supernet's training and from every finetune: the test split and the
    # validation part; accuracies are pooled over both (on digits, 360 + 288 images).
    test, val = (dataset.x_test, dataset.y_test), (fit.x_test, fit.y_test)
    splits = (("test", test), ("val", val))
    sizes = {name: len(split[1]) for name, split in splits}

    def pooled(accuracy: dict[str, float]) -> float:
        return sum(accuracy[k] * sizes[k] for k in sizes) / sum(sizes.values())

    space = api.space_for(args.space, dataset)
    config = api.supernet_config(api.Effort.of(quick=False), args.seed)
    config = dataclasses.replace(config, **args.overrides)
    torch.set_num_threads(config.num_threads or 1)
    name = spec.rsplit("/", 1)[-1].removesuffix(".npz").replace(":", "-")
    path = args.checkpoints / f"{name}-{config_tag(config)}"
    resolutions = list(next(p.choices for p in space.params if p.name == "resolution"))
    print(f"\n{spec}: space {space.name} at resolutions {resolutions}, config {config.to_dict()}")
    supernet = space.supernet()
    load, start, cpu = loads(), time.perf_counter(), time.process_time()
    report = train_supernet(supernet, space, fit, config, checkpoint=path.with_suffix(".pt"))
    print(
        f"{spec}: supernet trained in {time.perf_counter() - start:.0f} s wall, "
        f"{time.process_time() - cpu:.0f} s CPU ({config.epochs - report.start_epoch} epochs "
        f"here), load average {load} at start, {loads()} at end"
    )
    batches = calibration_batches(fit.x_train, seed=args.seed)
    rows = []
    start, cpu = time.perf_counter(), time.process_time()
    for candidate in spread(space, args.subnets, np.random.default_rng(args.seed)):
        inherited = {"test": evaluate_subnet(supernet, candidate, batches, test)}
        inherited["val"] = evaluate(supernet, val, candidate.resolution)  # still recalibrated
        model = space.build(candidate, supernet=supernet)  # recalibrated, int8 layers fake-quant
        finetune(model, fit, candidate.resolution, args.finetune_epochs)
        tuned = {name: evaluate(model, split, candidate.resolution) for name, split in splits}
        row = {
            "key": candidate.key()[:8],
            "resolution": candidate.resolution,
            "mmacs": space.cost(candidate).macs / 1e6,
            "int8_layers": sum(b == 8 for b in candidate.bits.values()),
            "layers": len(candidate.bits),
            "inherited": pooled(inherited),
            "finetuned": pooled(tuned),
        }
        row |= {f"inherited_{k}": v for k, v in inherited.items()}
        row |= {f"finetuned_{k}": v for k, v in tuned.items()}
        rows.append(row)
        print(
            f"  {row['key']}  res {row['resolution']:>3}  {row['mmacs']:>6.2f} MMACs  "
            f"{row['int8_layers']:>2}/{row['layers']} int8  inherited {row['inherited']:6.2%}  "
            f"finetuned {row['finetuned']:6.2%}  (test {inherited['test']:6.2%} "
            f"{tuned['test']:6.2%}, validation {inherited['val']:6.2%} {tuned['val']:6.2%})",
            flush=True,
        )
    taus = {
        suffix or "held-out": float(
            kendalltau(
                [r[f"inherited{suffix}"] for r in rows], [r[f"finetuned{suffix}"] for r in rows]
            ).statistic
        )
        for suffix in ("", "_test", "_val")
    }
    print(
        f"{spec}: Kendall tau-b over {len(rows)} subnets = {taus['held-out']:.3f} on all "
        f"{sizes['test'] + sizes['val']} held-out images (test split {taus['_test']:.3f}, "
        f"validation part {taus['_val']:.3f}); finetunes {time.perf_counter() - start:.0f} s "
        f"wall, {time.process_time() - cpu:.0f} s CPU, load average {loads()}"
    )
    result = {"data": spec, "config": config.to_dict(), "tau": taus}
    result |= {"finetune_epochs": args.finetune_epochs, "rows": rows}
    path.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return taus["held-out"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["digits", HARD])
    parser.add_argument("--subnets", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINTS)
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
