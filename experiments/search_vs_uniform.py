"""Issue 6, acceptance 4: does the joint search beat uniform width scaling at the same latency?

On a dataset harder than ``digits`` (default: experiments/data/digits_hard.npz, made by
experiments/make_hard_digits.py), under one measured latency budget on the ``cpu`` device:

* **searched**: ``autocomp search`` end to end (its run folder is kept and reused on re-runs);
* **uniform**: the space's full network (deepest stages, largest kernels and expansions, highest
  resolution) scaled by one width knob for all layers — every stage at the same width choice and
  every layer at the same keep ratio (``seeding.uniform_scalings``) — once all fp32 and once all
  int8. For each precision the widest scaling whose *measured* latency meets the budget is taken
  (measured widest first, no prediction involved; after its finetune it is verified as the
  search's choice is, and a miss passes to the next narrower scaling). The search evaluates the
  widest scaling of each precision that its latency model admits among its first trials
  (``seeding.search_seeds``) and finetunes those that measure within the budget next to its own
  best (``choice.arbitrate``), so this table shows what the search adds over the baseline.

Both sides get the same treatment after the choice: weights inherited from the same supernet,
then the same finetune (epochs, distillation from the largest subnet, QAT of the int8 layers),
export and on-device verification as the pipeline does. So the table isolates what the joint
choice of architecture, per-layer widths and bits buys over a width multiplier.

    python experiments/make_hard_digits.py    # once
    python experiments/search_vs_uniform.py [--budget 2ms] [--quick] [--supernet CKPT] [--trials N]

``--supernet`` shares a checkpoint trained with the same defaults on the same data (e.g. the one
experiments/ranking_fidelity.py leaves in runs/ranking_fidelity/), as ``autocomp search
--supernet`` does; without it the search trains its own.
Exit status 1 when the searched model is less accurate (test split) than the best uniform one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paired_accuracy import mcnemar, right_answers

from autocomp import api, data, hardware
from autocomp.budget import Budget
from autocomp.latency.space import SpaceLatency
from autocomp.search import seeding
from autocomp.spaces import Candidate
from autocomp.supernet.train import calibration_batches, evaluate_subnet

DATA = "npz:experiments/data/digits_hard.npz"


@dataclass
class Pipeline:
    """The context ``api.search`` built for a run: data, space, split, BN batches, supernet."""

    dataset: Any
    space: Any
    effort: api.Effort
    fit_part: Any
    bn_batches: list
    net: Any
    seed: int

    def finetune(self, candidate: Candidate) -> tuple[Any, dict[str, Any]]:
        """The candidate finetuned as the pipeline finetunes it (``api._finetune``)."""
        val = (self.fit_part.x_test, self.fit_part.y_test)
        return api._finetune(
            self.space,
            self.net,
            candidate,
            self.fit_part,
            self.bn_batches,
            lambda c: evaluate_subnet(self.net, c, self.bn_batches, val),
            self.effort,
            self.seed,
            False,
        )


def pipeline(
    data_spec: str, space: str, seed: int, quick: bool, run: Path, supernet: Path | None
) -> Pipeline:
    """Rebuild the search's context for the run folder ``run`` (its supernet, or ``supernet``
    where the run shared one); call under ``api._torch_threads`` as the pipeline does."""
    dataset = data.load(data_spec)
    space_obj = api.space_for(space, dataset)
    effort = api.Effort.of(quick)
    fit_part = dataset.validation_split(0.2, seed=seed)
    bn_batches = calibration_batches(fit_part.x_train, seed=seed)
    given = api._given_supernet(supernet or run / "supernet.pt", space_obj, seed)
    net = api._supernet(space_obj, fit_part, effort, seed, run, given, False)
    return Pipeline(dataset, space_obj, effort, fit_part, bn_batches, net, seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--budget", default="2ms")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/search-vs-uniform"))
    parser.add_argument("--supernet", type=Path, help="a trained checkpoint to share (as search's)")
    parser.add_argument("--trials", type=int, help="candidates the search evaluates (its default)")
    args = parser.parse_args()
    budget = Budget.parse(args.budget)
    if budget.latency_ms is None:
        parser.error("--budget must be a latency budget")
    out = args.out / args.budget

    start = time.perf_counter()
    load = os.getloadavg()[0]
    searched = api.search(
        args.data,
        budget,
        "cpu",
        out=out,
        resume=(out / "config.json").exists(),
        quick=args.quick,
        seed=args.seed,
        progress=False,
        supernet=args.supernet,
        trials=args.trials,
    )
    print(f"search: {time.perf_counter() - start:.0f} s (load at start {load:.1f})", flush=True)
    report = json.loads((out / "report.json").read_text())
    for m in report["shortlist"]:
        print(
            f"  shortlist trial {m['number']:>3}: val {m['accuracy']:.2%}, predicted "
            f"{m['latency_predicted_ms']:.3f} ms, measured {m['latency_measured_ms']:.3f} ms"
        )
    for m in report["arbitration"]:
        print(
            f"  contender trial {m['number']:>3}{' (baseline)' if m['baseline'] else ''}: "
            f"val {m['inherited_val_accuracy']:.2%} inherited, "
            f"{m['finetuned_val_accuracy']:.2%} finetuned{'  <- chosen' if m.get('chosen') else ''}"
        )

    # The same context the pipeline built: data split, BN batches, supernet, latency model.
    with api._torch_threads(1):
        context = pipeline(args.data, "mbv3", args.seed, args.quick, out, args.supernet)
        dataset, space, bn_batches = context.dataset, context.space, context.bn_batches
        device = hardware.get_device("cpu")
        latency = SpaceLatency.fit(
            space,
            hardware.get_device(
                "cpu", timing=hardware.Timing(warmup_s=0.2, min_runs=20, sessions=1)
            ),
            api._to_onnx(space, bn_batches),
            context.effort.latency_samples,
            seed=args.seed,
            progress=False,
        )

        rows = [("searched", searched.metrics["candidate"], searched.metrics, searched.onnx_path)]
        grids = {b: {c.key(): c for c in seeding.uniform_scalings(space, b)} for b in (32, 8)}
        chosen_key = Candidate.from_dict(searched.metrics["candidate"]).key()
        for bits, grid in grids.items():
            if chosen_key in grid:
                print(f"the search chose a uniform {bits}-bit scaling (one of its seeds)")
        for bits in (32, 8):
            verdict = None
            for chosen in grids[bits].values():  # widest first, each measured
                if latency.measure(chosen) > budget.latency_ms:
                    continue
                model, _ = context.finetune(chosen)
                folder = out / f"uniform-{bits}bit"
                verdict = api._export_and_verify(
                    model,
                    chosen,
                    space.cost(chosen).to_dict(),
                    dataset,
                    bn_batches,
                    device,
                    budget,
                    folder,
                )
                if verdict["meets_budget"]:  # verified as the search's choice is
                    break
                ms = verdict["measured"]["median_ms"]
                print(
                    f"uniform {bits}-bit at {space.cost(chosen).macs / 1e6:.2f} MMACs: "
                    f"verified at {ms:.3f} ms, over the budget; the next narrower"
                )
                verdict = None
            if verdict is None:
                print(f"uniform {bits}-bit: no width scaling meets {args.budget}")
                continue
            metrics = {
                "accuracy": verdict["accuracy"],
                "latency_ms": {"measured": verdict["measured"]},
                "macs": space.cost(chosen).macs,
            }
            rows.append((f"uniform {bits}-bit", chosen.to_dict(), metrics, folder / "model.onnx"))

    print(f"\ndata {args.data}, budget {args.budget} on cpu (1 thread), test split")
    print(f"{'model':<15} {'res':>4} {'MMACs':>7} {'meas ms':>8} {'torch':>7} {'onnx':>7}")
    for name, cand, m, _ in rows:
        print(
            f"{name:<15} {cand['resolution']:>4} {m['macs'] / 1e6:>7.2f} "
            f"{m['latency_ms']['measured']['median_ms']:>8.3f} {m['accuracy']['torch']:>7.2%} "
            f"{m['accuracy']['onnx']:>7.2%}"
        )
    if len(rows) == 1:
        print("no uniform scaling meets the budget: nothing to compare (choose a looser budget)")
        return 1
    best_uniform = max(rows[1:], key=lambda row: row[2]["accuracy"]["onnx"])
    margin = rows[0][2]["accuracy"]["onnx"] - best_uniform[2]["accuracy"]["onnx"]
    print(f"searched - best uniform (ONNX test accuracy): {margin:+.2%}")
    only_searched, only_uniform, p = mcnemar(
        right_answers(rows[0][3], dataset), right_answers(best_uniform[3], dataset)
    )
    print(
        f"paired on the test images: right only by the searched {only_searched}, only by the "
        f"{best_uniform[0]} {only_uniform}; exact McNemar p = {p:.4f}"
    )
    return 0 if margin >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
