"""Fit and evaluate predictors on dataset files (what ``autocomp predictor ...`` runs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autocomp.errors import AutocompError
from autocomp.hardware.base import DeviceInfo
from autocomp.latency.dataset import dataset_profile, kernel_inputs, profiled, read_records
from autocomp.latency.generator import encode_config
from autocomp.latency.metrics import latency_metrics, out_of_fold
from autocomp.latency.predictors import (
    ArchPredictor,
    KernelPredictor,
    LutPredictor,
    _Predictor,
    load,
)

KINDS = {"kernel": KernelPredictor, "arch": ArchPredictor, "lut": LutPredictor}


def arch_inputs(records: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Encodings and latencies: a record's ``encoding`` (search-space samples) or, for
    generated models, :func:`~autocomp.latency.generator.encode_config` of their config."""
    rows = []
    for r in records:
        if "encoding" in r:
            rows.append(np.asarray(r["encoding"], dtype=np.float64))
        elif "generator" in r.get("source", {}):
            rows.append(encode_config(r["source"]["generator"]["config"]))
        else:
            raise AutocompError(
                f"record {r['id']} has no encoding: arch and lut predictors need search-space "
                "samples or generated models; use --kind kernel for other models"
            )
    if len({len(x) for x in rows}) > 1:
        raise AutocompError("records have encodings of different lengths (mixed search spaces?)")
    return np.stack(rows), np.asarray([r["median_ms"] for r in records], dtype=np.float64)


def fit_dataset(
    data: str | Path, kind: str, out: str | Path, cross_validate: bool = False
) -> dict[str, Any]:
    """Fit a ``kind`` predictor on the dataset file ``data`` and save it to ``out``; with
    ``cross_validate``, also score it by :func:`cross_validated` (five more fits)."""
    if kind not in KINDS:
        raise AutocompError(f"unknown predictor kind {kind!r}; use one of {', '.join(KINDS)}")
    out = Path(out)
    if not out.parent.is_dir():
        raise AutocompError(f"output folder does not exist: {out.parent}")
    records = read_records(data)
    if len(records) < 2:
        raise AutocompError(f"{data}: needs at least 2 measurements to fit, has {len(records)}")
    dataset_profile(records, data)
    device = DeviceInfo.from_dict(records[0]["device"])
    if kind == "kernel":
        predictor: _Predictor = KernelPredictor(normalize=profiled(records), device=device).fit(
            *kernel_inputs(records)
        )
    else:
        X, y = arch_inputs(records)
        predictor = KINDS[kind](device=device).fit(X, y)
    summary = {"out": str(out), "kind": kind, "profile": device.profile, "n": len(records)}
    if cross_validate:
        summary["cross_validated"] = cross_validated(records, kind)
    predictor.save(out)
    return summary


def cross_validated(records: Sequence[dict[str, Any]], kind: str = "kernel") -> dict[str, float]:
    """:func:`~autocomp.latency.metrics.latency_metrics` of a ``kind`` predictor on its own
    dataset, each model predicted by one fitted without it (5 folds): truths of the data's own
    hour and estimator, so what is left is the predictor's error plus the measurement's noise."""
    if kind == "kernel":
        models, y, times = kernel_inputs(records)
        held_out = out_of_fold(
            len(y),
            lambda fit, rest: (
                KernelPredictor(normalize=profiled(records))
                .fit([models[i] for i in fit], y[fit], [times[i] for i in fit])
                .predict([models[i] for i in rest])
            ),
        )
    else:
        X, y = arch_inputs(records)
        held_out = out_of_fold(
            len(y), lambda fit, rest: KINDS[kind]().fit(X[fit], y[fit]).predict(X[rest])
        )
    return latency_metrics(y, held_out)


def predict_records(predictor: _Predictor, records: Sequence[dict[str, Any]]) -> np.ndarray:
    """Predicted latency (ms) of each record, by the predictor's own kind of input."""
    if isinstance(predictor, KernelPredictor):
        models, _, _ = kernel_inputs(records)
        return predictor.predict(models)
    X, _ = arch_inputs(records)
    return predictor.predict(X)


def evaluate_dataset(predictor_path: str | Path, data: str | Path) -> dict[str, Any]:
    """Metrics of a predictor on a dataset of the same device profile."""
    records = read_records(data)
    if not records:
        raise AutocompError(f"{data}: holds no measurements")
    profile = dataset_profile(records, data)
    predictor = load(predictor_path, DeviceInfo.from_dict(records[0]["device"]))
    y = np.asarray([r["median_ms"] for r in records])
    metrics = latency_metrics(y, predict_records(predictor, records))
    return {
        "predictor": str(predictor_path),
        "kind": predictor.kind,
        "profile": profile,
        "data": str(data),
        **metrics,
    }


def predict_file(
    predictor_path: str | Path, model: str | Path, input_shape: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """Predicted latency of an ONNX file, with its most expensive kernels."""
    from autocomp.hardware import load_onnx, static_input_shape
    from autocomp.latency.kernels import extract_kernels

    predictor = load(predictor_path)
    if not isinstance(predictor, KernelPredictor):
        raise AutocompError(
            f"a {predictor.kind} predictor predicts search-space encodings, not ONNX models; "
            "use a kernel predictor"
        )
    onnx_model = load_onnx(model)
    shape = tuple(input_shape or static_input_shape(onnx_model, model))
    kernels = extract_kernels(onnx_model, shape)
    per_kernel = predictor.predict_kernels(kernels)
    top = np.argsort(-per_kernel)[:10]
    return {
        "model": str(model),
        "input_shape": list(shape),
        "profile": predictor.device.profile if predictor.device else None,
        "latency_ms": float(predictor.predict([kernels])[0]),
        "kernels": len(kernels),
        "top_kernels": [
            {"name": kernels[i].name, "op": kernels[i].key, "ms": float(per_kernel[i])} for i in top
        ],
    }
