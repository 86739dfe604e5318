"""Issue 6, acceptance 2, 3 and 5: `autocomp search` end to end under budgets of every kind.

Runs the full pipeline (latency model, search, finetune, export, on-device verification) on
``digits`` for latency budgets of 2, 5 and 10 ms, a FLOPs budget and a size budget that bind for
the space, and a combination of three terms. The supernet is trained once (by the first run, or
given with ``--supernet``) and shared by the others, as ``autocomp search --supernet`` allows; the
latency model is cached per device profile, so it is fitted once too. Prints, per budget: the
chosen candidate, its exact and predicted/measured costs, whether every term is met as measured,
the share of a latency budget used, torch and ONNX test accuracy and the report's notes.

    python experiments/search_budgets.py                       # default effort, ~25 min
    python experiments/search_budgets.py --quick --budgets 5ms 10MFLOPs
Exit status 1 when a chosen model misses its budget or ONNX and torch differ by > 0.5 point.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from autocomp import api
from autocomp.budget import Budget

BUDGETS = ("2ms", "5ms", "10ms", "10MFLOPs", "1MB", "1ms,10MFLOPs,2MB")
ONNX_TOLERANCE = 0.005


def slug(budget: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "-" for c in budget)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    parser.add_argument("--data", default="digits")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--supernet", type=Path, help="a trained checkpoint to share")
    parser.add_argument("--out", type=Path, default=Path("runs/search-budgets"))
    args = parser.parse_args()

    supernet = args.supernet
    rows, ok = [], True
    for text in args.budgets:
        budget = Budget.parse(text)
        out = args.out / slug(text)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        result = api.search(
            args.data,
            budget,
            "cpu",
            out=out,
            resume=(out / "config.json").exists(),
            quick=args.quick,
            supernet=supernet,
            progress=False,
        )
        wall = time.perf_counter() - start
        supernet = supernet or out / "supernet.pt"
        report = api.report(out)
        chosen = report["chosen"]
        acc = chosen["accuracy"]
        measured = chosen["latency_ms"]["measured"]["median_ms"]
        share = f"{measured / budget.latency_ms:.0%}" if budget.latency_ms else "-"
        gap = abs(acc["torch"] - acc["onnx"])
        ok &= result.meets_budget and gap <= ONNX_TOLERANCE
        timings = ", ".join(f"{k} {v:.0f}" for k, v in report["timings_s"].items())
        rows.append(
            (text, chosen, measured, share, result.meets_budget, acc, gap, report, wall, load)
        )
        print(f"{text}: {wall:.0f} s (load {load:.1f}); stages (s): {timings}", flush=True)

    print()
    print(
        f"{'budget':<18} {'res':>3} {'MFLOPs':>7} {'size MB':>7} {'pred ms':>7} {'meas ms':>7} "
        f"{'share':>5} {'met':>4} {'torch':>6} {'onnx':>6} {'|diff|':>6}"
    )
    for text, chosen, measured, share, met, acc, gap, report, *_ in rows:
        cand = chosen["candidate"]
        print(
            f"{text:<18} {cand['resolution']:>3} {chosen['flops'] / 1e6:>7.2f} "
            f"{chosen['size_bytes'] / 1e6:>7.3f} {chosen['latency_ms']['predicted']:>7.3f} "
            f"{measured:>7.3f} {share:>5} {met!s:>4} {acc['torch']:>6.2%} {acc['onnx']:>6.2%} "
            f"{gap:>6.2%}"
        )
        for note in report["notes"]:
            print(f"{'':<18} note: {note}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
