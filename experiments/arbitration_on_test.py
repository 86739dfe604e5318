"""How would each tie rule of the search's arbitration have chosen, judged on the test split?

The arbitration (``autocomp.search.choice.arbitrate``) finetunes a few contenders and keeps the
most accurate on validation, reading accuracies within one standard error of the best as ties
(288 validation images on digits_hard: the band is about 2.4 points wide). Which contender of
the band to ship is then a rule: the lowest validation cross-entropy (autocomp's), the most MACs
(the search's until 2026-12-07), or plainly the highest validation accuracy. A run keeps only
the chosen model, so this script finetunes every contender of a finished run again as the
pipeline does (same supernet, split, seed and finetune; the validation accuracy it records
beside the run's shows how closely that repeats), and reports each contender's validation loss
and test accuracy, then what each rule would have shipped.

    python experiments/arbitration_on_test.py runs/svu-intel-1ms-s2/1ms [more run folders]

A run folder of ``autocomp search`` (or experiments/search_vs_uniform.py) with its
report.json, config.json, study.db and supernet.pt; a supernet shared with ``--supernet`` is
named by ``--supernet`` here too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import optuna
from search_vs_uniform import pipeline

from autocomp import api
from autocomp.search.choice import tied_with
from autocomp.spaces import Candidate
from autocomp.supernet.train import evaluate

RULES = {
    "lowest val loss in the band (autocomp)": lambda row: row["val_loss"],
    "most MACs in the band": lambda row: -row["macs"],
    "highest val accuracy": lambda row: -row["val_accuracy"],
}


def contenders_on_test(run: Path, supernet: Path | None) -> list[dict]:
    """Every arbitration contender of ``run`` finetuned again, with val and test scores."""
    report = json.loads((run / "report.json").read_text())
    config = json.loads((run / "config.json").read_text())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{run / 'study.db'}")
    trials = {t.number: t for t in study.trials}
    rows = []
    with api._torch_threads(1):
        context = pipeline(
            config["data"], config["space"], config["seed"], config["quick"], run, supernet
        )
        test = (context.dataset.x_test, context.dataset.y_test)
        for entry in report["arbitration"]:
            candidate = Candidate.from_dict(
                json.loads(trials[entry["number"]].user_attrs["candidate"])
            )
            model, tuned = context.finetune(candidate)
            rows.append(
                {
                    "number": entry["number"],
                    "baseline": entry["baseline"],
                    "chosen": bool(entry.get("chosen")),
                    "macs": entry["macs"],
                    "recorded_val_accuracy": entry["finetuned_val_accuracy"],
                    "val_accuracy": tuned["val_accuracy"],
                    "val_loss": tuned["val_loss"],
                    "test_accuracy": evaluate(model, test, candidate.resolution),
                }
            )
    band = tied_with(max(r["val_accuracy"] for r in rows), len(context.fit_part.y_test))
    tied = [r for r in rows if r["val_accuracy"] >= band]
    for name, key in RULES.items():
        min(tied, key=key).setdefault("rules", []).append(name)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders of finished searches")
    parser.add_argument("--supernet", type=Path, help="the checkpoint the runs shared, if any")
    args = parser.parse_args()
    shipped: dict[str, list[float]] = {name: [] for name in RULES}
    for run in args.runs:
        rows = contenders_on_test(run, args.supernet)
        print(f"\n{run}")
        print(f"{'trial':>5} {'MMACs':>6} {'val (run)':>9} {'val':>7} {'val loss':>8} {'test':>7}")
        for r in rows:
            mark = " baseline" if r["baseline"] else ""
            mark += " <- shipped" if r["chosen"] else ""
            print(
                f"{r['number']:>5} {r['macs'] / 1e6:>6.2f} {r['recorded_val_accuracy']:>9.2%} "
                f"{r['val_accuracy']:>7.2%} {r['val_loss']:>8.4f} {r['test_accuracy']:>7.2%}{mark}"
            )
        for r in rows:
            for name in r.get("rules", []):
                shipped[name].append(r["test_accuracy"])
                print(f"  {name}: trial {r['number']} ({r['test_accuracy']:.2%} test)")
    print("\nmean test accuracy of what each rule ships, over the runs:")
    for name, accs in shipped.items():
        print(f"  {name:<42} {np.mean(accs):.2%}")


if __name__ == "__main__":
    main()
