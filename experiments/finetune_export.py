"""The finish stage on digits: extract a mixed int8/fp32 subnet, finetune it, export it, verify.

Supernet: the quickly trained ``mbv3-digits`` one of search_setup.py (the built-in ``mbv3``
space at resolutions 32–48, trained with ``train_supernet`` on the training part of digits'
validation split; reused from ``runs/search-experiments/`` when it is there, trained otherwise).
A small candidate at 48 px with about half its layers int8 is extracted (BN recalibrated,
observers calibrated), finetuned with KD from the supernet's largest subnet plus the labels and a
QAT phase (early stopping on the validation part), then exported: int8 layers as QDQ with the
trained scales, plus an all-fp32 and an all-int8 twin of the same weights (the latter with ONNX
Runtime-calibrated ranges for the candidate's fp32 layers: a latency reference only). Printed:
validation and test accuracy in torch and in ONNX Runtime, their difference (target: at most 0.5
point), file sizes and latencies on ``get_device("cpu")`` (ONNX Runtime, 1 thread).

    nice -n 5 python experiments/finetune_export.py [--epochs 12] [--qat-epochs 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch
from search_setup import RUN, quick_space, trained_supernet, validation_data

from autocomp.data import load
from autocomp.finetune import FinetuneConfig, finetune
from autocomp.hardware import get_device
from autocomp.quant.export import export_onnx, onnx_accuracy
from autocomp.quant.fake import set_quantization
from autocomp.spaces import Candidate, SearchSpace
from autocomp.supernet.bn import recalibrate_bn
from autocomp.supernet.train import calibration_batches, evaluate, evaluate_subnet, view

TARGET = 0.005  # |ONNX - torch| test accuracy


def small_candidate(space: SearchSpace, rng: np.random.Generator, resolution: int) -> Candidate:
    """Two blocks per stage at the narrowest widths; kernels, expands, keeps and bits at random."""
    values = {}
    for p in space.params:
        if p.kind == "depth":
            values[p.name] = sorted(p.choices)[min(1, len(p.choices) - 1)]
        elif p.kind == "width":
            values[p.name] = min(p.choices)
        else:
            values[p.name] = p.choices[rng.integers(len(p.choices))]
    values["resolution"] = resolution
    return space.from_values(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training")
    args = parser.parse_args()

    space, data = quick_space(), validation_data()
    full = load("digits")
    train, val, test = (
        (data.x_train, data.y_train),
        (data.x_test, data.y_test),
        (full.x_test, full.y_test),
    )
    start = time.perf_counter()
    supernet = trained_supernet(space, data)
    torch.set_num_threads(args.threads)
    print(f"supernet ready in {time.perf_counter() - start:.0f} s")

    c = small_candidate(space, np.random.default_rng(args.seed), args.resolution)
    int8 = sorted(name for name, b in c.bits.items() if b == 8)
    cost = space.cost(c)
    print(
        f"candidate {c.key()[:10]}: {args.resolution} px, {cost.macs / 1e6:.2f}M MACs, "
        f"{cost.params / 1e3:.1f}k params, {len(int8)}/{len(c.bits)} layers int8"
    )
    bn = calibration_batches(data.x_train, count=256, batch_size=128, seed=0)
    inherited = evaluate_subnet(supernet, c, bn, val)
    student = space.build(c, supernet=supernet)

    largest = space.largest()
    supernet.set_active(largest).set_quantization(False)
    recalibrate_bn(supernet, (view(b, largest.resolution) for b in bn))  # c's stats were there
    teacher_val = evaluate(supernet, val, largest.resolution)
    print(f"teacher (largest, {largest.resolution} px): validation {teacher_val:.2%}")

    config = FinetuneConfig(
        epochs=args.epochs, qat_epochs=args.qat_epochs, seed=args.seed, num_threads=args.threads
    )
    report = finetune(
        student,
        supernet,
        train,
        val,
        config,
        resolution=c.resolution,
        teacher_resolution=largest.resolution,
    )
    print(
        f"finetune: {report.wall_s:.0f} s, {len(report.history)} epochs"
        f"{' (stopped early)' if report.stopped_early else ''}, best epoch {report.best_epoch}; "
        f"validation {report.start_accuracy:.2%} (given, fp32) / {inherited:.2%} (inherited, "
        f"mixed) -> {report.val_accuracy:.2%}"
    )
    for r in report.history:
        print(
            f"  epoch {r.epoch:>2} {r.phase:<4} loss {r.loss:.3f} validation {r.val_accuracy:.2%}"
        )

    fp32_model = set_quantization(copy.deepcopy(student), False)
    out = RUN.parent / "finetune-export"
    shape = (1, 1, c.resolution, c.resolution)
    mixed = export_onnx(student, c, shape, out / "model.onnx", calibration_batches=bn)
    fp32 = export_onnx(student, {}, shape, out / "model-fp32.onnx", calibration_batches=bn)
    all8 = dict.fromkeys(c.bits, 8)
    int8_all = export_onnx(student, all8, shape, out / "model-int8.onnx", calibration_batches=bn)
    print(
        f"export: {len(mixed.quantized_nodes)} QDQ nodes for {len(int8)} int8 layers, "
        f"{len(mixed.observed)} with QAT-trained scales -> {mixed.path}"
    )

    device = get_device("cpu")
    rows = []
    for name, model, info in (
        ("mixed", student, mixed),
        ("fp32", fp32_model, fp32),
        ("int8", None, int8_all),  # every layer int8; ranges of the candidate's fp32 layers: PTQ
    ):
        m = device.measure(info.path, shape)
        torch_val, torch_test = (
            (evaluate(model, split, c.resolution) for split in (val, test))
            if model is not None
            else (None, None)
        )
        onnx_val, onnx_test = (
            onnx_accuracy(info.path, split, c.resolution) for split in (val, test)
        )
        rows.append((name, torch_val, onnx_val, torch_test, onnx_test, info.size_bytes, m))
    print(
        f"\n{'model':<6} {'val torch':>9} {'val ONNX':>9} {'test torch':>10} {'test ONNX':>9} "
        f"{'diff':>8} {'size KB':>8} {'ORT ms (p10-p90)':>22}"
    )
    for name, vt, vo, tt, to, size, m in rows:
        diff = f"{(to - tt) * 100:+6.2f}pt" if tt is not None else "-"
        print(
            f"{name:<6} {_pct(vt):>9} {_pct(vo):>9} {_pct(tt):>10} {_pct(to):>9} {diff:>8} "
            f"{size / 1024:>8.1f} {m.median_ms:>8.3f} ({m.p10_ms:.3f}-{m.p90_ms:.3f})"
        )
    print(
        f"predicted size of the mixed model {cost.size_bytes / 1024:.1f} KB; latency of the mixed "
        f"model / fp32 {rows[0][6].median_ms / rows[1][6].median_ms:.2f}, all-int8 / fp32 "
        f"{rows[2][6].median_ms / rows[1][6].median_ms:.2f}"
    )
    ok = abs(rows[0][4] - rows[0][3]) <= TARGET
    print(
        "PASS" if ok else "FAIL", f"(|test ONNX - test torch| of the mixed model <= {TARGET:.1%})"
    )
    return 0 if ok else 1


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


if __name__ == "__main__":
    sys.exit(main())
