"""Ray backend throughput: 2 workers vs 1 on an evaluation-bound search (target ≥ 1.7×).

Every evaluation is a real, uncached supernet evaluation of the mbv3-digits space (see
search_setup.py; BN recalibration + validation accuracy, one torch thread per worker). Both
runs of a pair use the same seed and the random sampler, whose proposals do not depend on the
results, so they evaluate the same candidates. Pairs alternate (1, 2, 1, 2, ...) so that a change
of load from the other users of this machine hits both; the load average is printed beside each,
and before each pair the parallelism the machine offers right then: how much faster two plain
CPU-bound processes do twice the work of one (2.0 on two idle cores). That is the ceiling of any
2-worker speed-up; the ratio of Ray's speed-up to it is what the backend itself achieves.

    python experiments/ray_throughput.py [--evaluations 16] [--pairs 2]
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import time

import numpy as np
import optuna
import ray
from search_setup import RUN, setting

from autocomp.budget import Budget
from autocomp.search import run_search
from autocomp.supernet.train import evaluate_subnet


def _burn(n: int) -> int:
    return sum(i * i for i in range(n))


def available_parallelism(n: int = 10_000_000) -> float:
    """Two processes doing ``n`` steps each vs one doing ``n``: 2.0 on two free cores."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_burn, [1000, 1000])  # start both processes
        start = time.perf_counter()
        pool.map(_burn, [n])
        one = time.perf_counter() - start
        start = time.perf_counter()
        pool.map(_burn, [n, n], chunksize=1)
        two = time.perf_counter() - start
    return 2 * one / two


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()

    space, _, cached = setting(progress=False)
    evaluate = functools.partial(
        evaluate_subnet, cached.supernet, bn_batches=cached.bn, eval_split=cached.split
    )
    rng = np.random.default_rng(0)
    budget = Budget(
        flops=float(np.median([space.cost(space.sample(rng)).flops for _ in range(500)]))
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"{os.cpu_count()} CPUs, budget {budget}, {args.evaluations} evaluations per search")
    walls: dict[int, list[float]] = {1: [], 2: []}
    try:
        for pair in range(args.pairs):
            print(f"  machine parallelism now: {available_parallelism():.2f}×", flush=True)
            for workers in (1, 2):
                load = os.getloadavg()[0]
                start = time.perf_counter()
                result = run_search(
                    space,
                    budget,
                    evaluate_fn=evaluate,
                    sampler="random",
                    n_trials=args.evaluations,
                    seed=pair,
                    run_dir=RUN,
                    storage=optuna.storages.InMemoryStorage(),
                    backend="ray",
                    workers=workers,
                    progress=False,
                )
                wall = time.perf_counter() - start
                walls[workers].append(wall)
                assert result.n_evaluated == args.evaluations
                rate = args.evaluations / wall
                print(
                    f"  pair {pair} workers {workers}: {wall:6.1f} s, {rate:.3f} evaluations/s "
                    f"(load average before: {load:.1f})",
                    flush=True,
                )
    finally:
        ray.shutdown()
    one, two = sum(walls[1]), sum(walls[2])
    print(f"\nspeed-up of 2 workers over 1: {one / two:.2f}× (per pair: ", end="")
    print(", ".join(f"{a / b:.2f}×" for a, b in zip(walls[1], walls[2], strict=True)) + ")")


if __name__ == "__main__":
    main()
