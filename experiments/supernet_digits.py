"""Acceptance 4 of issue 4: supernet training on ``digits`` with the default settings.

Trains the ``mbv3`` supernet with ``TrainConfig()`` on 2 threads, then scores the largest and the
smallest subnets on the test split after BatchNorm recalibration (no finetuning), each as an fp32
and as an all-int8 twin. Exits non-zero when a criterion fails: training ≤ 10 minutes, largest
≥ 97 %, smallest ≥ 90 %, every int8 twin within 1 point of its fp32 twin.

    python experiments/supernet_digits.py [--threads 2] [--set epochs=12 lr=0.1 ...]
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

from autocomp import data
from autocomp.spaces import Candidate, get_space
from autocomp.supernet.train import (
    TrainConfig,
    calibration_batches,
    evaluate_subnet,
    train_supernet,
)

LIMIT_S = 600


def with_bits(candidate: Candidate, bits: int) -> Candidate:
    return dataclasses.replace(candidate, bits=dict.fromkeys(candidate.bits, bits))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--space", default="mbv3")
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, key=value")
    parser.add_argument("--checkpoint", type=Path, help="save (or resume, or reuse) the supernet")
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = TrainConfig(**{"num_threads": args.threads, **overrides})
    print(f"config: {config.to_dict()}")

    dataset = data.load("digits")
    space = get_space(args.space, num_classes=dataset.num_classes, in_channels=1)
    supernet = space.supernet()
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    report = train_supernet(supernet, space, dataset, config, checkpoint=args.checkpoint)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"training: {wall:.0f} s wall, {cpu:.0f} s CPU, load average at start {load:.1f}")
    print(f"epoch losses of the largest: {[round(x, 3) for x in report.losses]}")
    if report.start_epoch:
        print(f"(resumed at epoch {report.start_epoch}: the wall time covers the rest only)")

    torch.set_num_threads(args.threads)
    batches = calibration_batches(dataset.x_train)
    test = (dataset.x_test, dataset.y_test)
    ok = wall <= LIMIT_S
    print(f"{'subnet':<9} {'res':>4} {'MMACs':>7} {'fp32':>7} {'int8':>7}")
    for name, base, floor in (
        ("largest", space.largest(), 0.97),
        ("smallest", space.smallest(), 0.90),
    ):
        fp32, int8 = (evaluate_subnet(supernet, with_bits(base, b), batches, test) for b in (32, 8))
        macs = space.cost(base).macs / 1e6
        print(f"{name:<9} {base.resolution:>4} {macs:>7.1f} {fp32:>7.2%} {int8:>7.2%}")
        ok &= fp32 >= floor and abs(fp32 - int8) <= 0.01
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
