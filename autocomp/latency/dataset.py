"""Latency datasets: measured models stored one JSON object per line (JSONL), append-only.

Each record holds what a predictor needs and what an audit needs: the id (``gen-SEED-INDEX`` for
generated models, ``file-SHA`` for user models), how to rebuild the model (generator config or
source path), the input shape, the device's ``DeviceInfo`` (its profile is the file's key), the
ONNX Runtime version, median/p10/p90 latency, the executed kernels (op, shapes, attributes) and
their times: micro-benchmarked with the thread clock (``kernel_times_ms``, see
:mod:`~autocomp.latency.microbench`) on this machine's ``cpu`` device, or the per-node profile
(``node_times_ms``) from any other device.

Appending is crash-safe: every record is one flushed, fsynced line, a torn last line (a killed
run) is cut off before the next append, and re-running a measurement skips the ids already there.
A file never mixes device profiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from autocomp.errors import AutocompError
from autocomp.hardware import Timing, load_onnx, static_input_shape
from autocomp.hardware.base import Device, OnnxModel
from autocomp.hardware.ort_device import OrtDevice
from autocomp.latency.generator import generate, sample_id
from autocomp.latency.kernels import Kernel, extract_kernels, join_times
from autocomp.latency.microbench import benchmark_kernels

RECORD_VERSION = 2
#: Timing of a whole model for a dataset: shorter than a single measurement's default, so that
#: the shipped dataset fits in 15 minutes of measurement. A neighbour's load only ever slows a
#: session down, so each model is timed in ``SESSIONS`` sessions (before and after its kernels)
#: and keeps the fastest median.
TIMING = Timing(warmup_runs=3, warmup_s=0.1, max_warmup_s=1.0, min_runs=10, min_s=0.3, sessions=1)
SESSIONS = 2
#: Profiled devices: sessions a model whose median is inconsistent with its profile gets.
REMEASURE = 2


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a dataset file; a torn last line (interrupted append) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise AutocompError(f"dataset file not found: {path}")
    lines = path.read_text().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "id" not in record or "median_ms" not in record:
                raise ValueError("not a measurement record")
        except ValueError as err:
            if i == len(lines) - 1:  # torn final line of an interrupted run
                break
            raise AutocompError(f"{path}:{i + 1}: corrupt dataset line ({err})") from None
        records.append(record)
    return records


def dataset_profile(records: Sequence[dict[str, Any]], path: str | Path = "dataset") -> str:
    """The single device profile of a dataset's records (a file never mixes profiles)."""
    profiles = {r["device"]["profile"] for r in records}
    if len(profiles) != 1:
        raise AutocompError(f"{path}: holds {len(profiles)} device profiles, expected one")
    return profiles.pop()


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (no trailing newline) so the next append starts a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        f.truncate(data.rfind(b"\n") + 1)


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as one durable line."""
    path = Path(path)
    line = json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n"
    with path.open("a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def make_record(
    device: Device,
    model: OnnxModel,
    input_shape: tuple[int, ...],
    *,
    record_id: str,
    source: dict[str, Any],
) -> dict[str, Any]:
    """Measure ``model`` on ``device`` and describe and time its kernels.

    This machine's ``cpu`` device: ``SESSIONS`` timed sessions (fastest median kept) and a
    micro-benchmark of every kernel. Other devices (remote, CUDA): one session with the profiler
    on, measured again (at most ``REMEASURE`` times, fastest median kept) while the median is
    well above the sum of the profiled node times (:func:`consistent`).
    """
    record: dict[str, Any] = {"version": RECORD_VERSION, "id": record_id, "source": source}
    if _benchmarkable(device):
        threads = device.threads  # type: ignore[attr-defined]
        sessions = [device.measure(model, input_shape)]
        kernels, kernel_times = benchmark_kernels(model, input_shape, threads=threads)
        sessions += [device.measure(model, input_shape) for _ in range(SESSIONS - 1)]
        m = min(sessions, key=lambda s: s.median_ms)
        record["session_medians_ms"] = [s.median_ms for s in sessions]
        record["kernel_times_ms"] = kernel_times
    else:
        m = device.measure(model, input_shape, profile=True)
        for _ in range(REMEASURE):
            if consistent(m.median_ms, m.node_times_ms):
                break
            again = device.measure(model, input_shape, profile=True)
            m = again if again.median_ms < m.median_ms else m
        kernels = extract_kernels(model, input_shape)
        ran = list((m.node_ops or {}).items())
        record["node_times_ms"] = join_times(kernels, ran, m.node_times_ms or {})
    record.update(
        {
            "input_shape": list(input_shape),
            "device": m.info.to_dict(),
            "ort_version": ort.__version__,
            "host": platform.node(),
            "median_ms": m.median_ms,
            "p10_ms": m.p10_ms,
            "p90_ms": m.p90_ms,
            "runs": len(m.samples),
            "kernels": [k.to_dict() for k in kernels],
        }
    )
    return record


def _benchmarkable(device: Device) -> bool:
    """Whether the device runs ONNX Runtime on this machine's CPU (kernels can be timed here)."""
    return isinstance(device, OrtDevice) and device.cuda is None


def consistent(median_ms: float, node_times_ms: dict[str, float] | None) -> bool:
    """Whether a median is not inflated: at most 25% above its profiled node times' sum.

    (A profile slower than the timed runs is harmless: predictors use it only to split the
    timed latency across kernels.)
    """
    if not node_times_ms:
        return True
    return median_ms <= 1.25 * sum(node_times_ms.values())


def _open_dataset(out: Path, profile: str) -> set[str]:
    """Ids already in ``out`` (after repairing a torn tail), refusing another profile's file."""
    if not out.exists():
        if not out.parent.is_dir():
            raise AutocompError(f"output folder does not exist: {out.parent}")
        return set()
    records = read_records(out)
    if records and dataset_profile(records, out) != profile:
        raise AutocompError(
            f"{out} holds measurements for device profile {records[0]['device']['profile']}, "
            f"not {profile}; write to another file"
        )
    _repair_tail(out)
    return {r["id"] for r in records}


def measure_generated(
    device: Device,
    n: int,
    out: str | Path,
    *,
    seed: int = 0,
    batch: int = 1,
    progress: bool = True,
) -> int:
    """Make ``out`` hold generated samples ``0..n-1`` of ``seed``; returns how many were added."""
    out = Path(out)
    profile = device.info.with_batch(batch).profile
    done = _open_dataset(out, profile)
    todo = [i for i in range(n) if sample_id(seed, i) not in done]
    for i in tqdm(todo, desc=f"measuring {out.name}", unit="model", disable=not progress):
        sample = generate(seed, i, batch)
        source = {"generator": {"seed": seed, "index": i, "config": sample.config}}
        record = make_record(
            device, sample.onnx_model, sample.input_shape, record_id=sample.id, source=source
        )
        append_record(out, record)
    return len(todo)


def measure_files(
    device: Device,
    paths: Iterable[str | Path],
    out: str | Path,
    *,
    input_shape: tuple[int, ...] | None = None,
    progress: bool = True,
) -> int:
    """Add user ONNX models to the dataset ``out`` (skipping ones already measured)."""
    out = Path(out)
    models = []
    for p in paths:
        model = load_onnx(p)
        shape = tuple(input_shape or static_input_shape(model, p))
        digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16]
        models.append((f"file-{digest}-b{shape[0]}", Path(p), model, shape))
    done = _open_dataset(out, device.info.with_batch(models[0][3][0] if models else 1).profile)
    todo = [m for m in models if m[0] not in done]
    for rid, path, model, shape in tqdm(todo, desc="measuring", unit="model", disable=not progress):
        source = {"file": str(path), "name": path.stem}
        append_record(out, make_record(device, model, shape, record_id=rid, source=source))
    return len(todo)


def kernel_inputs(
    records: Sequence[dict[str, Any]],
) -> tuple[list[list[Kernel]], np.ndarray, list[dict[str, float]]]:
    """What :meth:`KernelPredictor.fit` takes, from dataset records: kernel lists, latencies and
    kernel times (micro-benchmarked where the record has them, else profiled)."""
    models = [[Kernel.from_dict(k) for k in r["kernels"]] for r in records]
    y = np.asarray([r["median_ms"] for r in records], dtype=np.float64)
    times = [dict(r.get("kernel_times_ms") or r.get("node_times_ms") or {}) for r in records]
    return models, y, times


def profiled(records: Sequence[dict[str, Any]]) -> bool:
    """Whether the records' kernel times are profiled node times (to be normalised to the
    measured latency) rather than micro-benchmarks."""
    return any("kernel_times_ms" not in r and r.get("node_times_ms") for r in records)
