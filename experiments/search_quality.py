"""Search quality at a fixed number of evaluated candidates: tpe and evolution vs random.

On the real mbv3-digits supernet (see search_setup.py: direct evaluation = supernet weights + BN
recalibration, accuracy on the validation split carved from digits' training split), under a
FLOPs budget that binds (exact cost, so no latency model is involved), each sampler gets the same
number of direct evaluations; proposals screened out by the budget are free for all of them. The
table gives, per sampler, the best validation accuracy found for each seed and the median over
the seeds. Evaluations are cached by candidate, so re-runs and overlapping searches are cheap.

    nice -n 5 python experiments/search_quality.py [--evaluations 30] [--seeds 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import optuna
from search_setup import RUN, setting

from autocomp.budget import Budget
from autocomp.search import run_search

SAMPLERS = ("random", "tpe", "evolution")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--budget-quantile",
        type=float,
        default=0.3,
        help="FLOPs budget = this quantile of the FLOPs of uniformly random candidates",
    )
    args = parser.parse_args()

    space, _, evaluate = setting(progress=False)
    rng = np.random.default_rng(1234)
    flops = [space.cost(space.sample(rng)).flops for _ in range(2000)]
    budget = Budget(flops=float(np.quantile(flops, args.budget_quantile)))
    print(
        f"space {space.name}, budget {budget} (the {args.budget_quantile:.0%} quantile of random "
        f"candidates' FLOPs), {args.evaluations} direct evaluations per search, "
        f"seeds 0-{args.seeds - 1}"
    )

    best: dict[str, list[float]] = {s: [] for s in SAMPLERS}
    wall: dict[str, float] = dict.fromkeys(SAMPLERS, 0.0)
    for seed in range(args.seeds):
        for sampler in SAMPLERS:
            start = time.perf_counter()
            result = run_search(
                space,
                budget,
                evaluate_fn=evaluate,
                sampler=sampler,
                n_trials=args.evaluations,
                seed=seed,
                run_dir=RUN,
                storage=optuna.storages.InMemoryStorage(),  # the record is not needed here
                progress=False,
            )
            wall[sampler] += time.perf_counter() - start
            assert result.n_evaluated == args.evaluations
            assert result.best_metrics["flops"] <= budget.flops
            best[sampler].append(result.best_metrics["accuracy"])
            print(
                f"  seed {seed} {sampler:<9} best {best[sampler][-1]:.4f} "
                f"({result.best_metrics['flops'] / 1e6:.2f} MFLOPs, "
                f"{len(result.trials)} proposals, {time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    print(f"\n{'sampler':<10}" + "".join(f"{f'seed {s}':>9}" for s in range(args.seeds)), end="")
    print(f"{'median':>9}{'mean':>9}{'wall s':>9}")
    for sampler in SAMPLERS:
        row = best[sampler]
        print(
            f"{sampler:<10}"
            + "".join(f"{v:>9.4f}" for v in row)
            + f"{np.median(row):>9.4f}{np.mean(row):>9.4f}{wall[sampler]:>9.0f}"
        )
    print(f"\n{evaluate.calls} new direct evaluations, {evaluate.seconds:.0f} s of evaluation")


if __name__ == "__main__":
    main()
