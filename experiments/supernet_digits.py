"""Acceptance 4 of issue 4: supernet training on ``digits`` with the product's default settings.

Trains the supernet exactly as ``autocomp search`` does by default: the same space
(``api.space_for``: for 8×8 digits, ``mbv3`` at resolution 32), the same training config
(``api.supernet_config(api.Effort.of(quick=False), seed)``: ``TrainConfig``'s defaults, one torch
thread) and the same data (the fit part of the stratified validation split of the training split).
Then scores the largest and the smallest subnets on the *test* split (never seen in training)
after BatchNorm recalibration on 512 fit-part images, without finetuning, each as an fp32 and as
an all-int8 twin. Exits non-zero when a criterion fails: training ≤ 10 minutes, largest ≥ 97 %,
smallest ≥ 90 %, every int8 twin within 1 point of its fp32 twin.

    nice -n 5 python experiments/supernet_digits.py [--seed 0] [--set epochs=10 lr=0.01 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import yaml
from ranking_fidelity import CHECKPOINTS, config_tag  # beside this script: the two share

from autocomp import api, data
from autocomp.spaces import Candidate
from autocomp.supernet.train import calibration_batches, evaluate_subnet, train_supernet

LIMIT_S = 600
FLOORS = {"largest": 0.97, "smallest": 0.90}
MAX_INT8_GAP = 0.01


def with_bits(candidate: Candidate, bits: int) -> Candidate:
    """``candidate`` with every layer at ``bits``."""
    return dataclasses.replace(candidate, bits=dict.fromkeys(candidate.bits, bits))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="mbv3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, key=value")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="save (or resume, or reuse) the supernet; default: ranking_fidelity.py's for digits",
    )
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = api.supernet_config(api.Effort.of(quick=False), args.seed)
    config = dataclasses.replace(config, **overrides)
    torch.set_num_threads(config.num_threads or 1)  # the product evaluates on one thread too
    print(f"config: {config.to_dict()}")
    checkpoint = args.checkpoint or CHECKPOINTS / f"digits-{config_tag(config)}.pt"

    dataset = data.load("digits")
    fit = dataset.validation_split(0.2, seed=args.seed)  # what the product trains on
    space = api.space_for(args.space, dataset)
    resolutions = next(p.choices for p in space.params if p.name == "resolution")
    print(f"space {space.name}, resolutions {list(resolutions)}, {len(fit.y_train)} fit images")
    supernet = space.supernet()
    load = os.getloadavg()
    start, cpu = time.perf_counter(), time.process_time()
    report = train_supernet(supernet, space, fit, config, checkpoint=checkpoint)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    end_load = os.getloadavg()
    print(
        f"training: {wall:.0f} s wall, {cpu:.0f} s CPU; load average (1/5/15 min) "
        f"{'/'.join(f'{v:.1f}' for v in load)} at start, "
        f"{'/'.join(f'{v:.1f}' for v in end_load)} at end"
    )
    print(f"epoch losses of the largest: {[round(x, 3) for x in report.losses]}")
    if report.start_epoch:
        print(f"(resumed at epoch {report.start_epoch}: the times cover the rest only)")

    batches = calibration_batches(fit.x_train, seed=args.seed)
    test = (dataset.x_test, dataset.y_test)
    ok = wall <= LIMIT_S
    print(f"{'subnet':<9} {'res':>4} {'MMACs':>7} {'fp32':>7} {'int8':>7}  (test split)")
    for name, base in (("largest", space.largest()), ("smallest", space.smallest())):
        fp32, int8 = (evaluate_subnet(supernet, with_bits(base, b), batches, test) for b in (32, 8))
        macs = space.cost(base).macs / 1e6
        print(f"{name:<9} {base.resolution:>4} {macs:>7.2f} {fp32:>7.2%} {int8:>7.2%}")
        ok &= fp32 >= FLOORS[name] and abs(int8 - fp32) <= MAX_INT8_GAP
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
