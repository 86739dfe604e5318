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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from autocomp.errors import AutocompError
from autocomp.hardware import Timing, load_onnx, static_input_shape
from autocomp.hardware.base import Device, Measurement, OnnxModel
from autocomp.hardware.ort_device import OrtDevice
from autocomp.latency.generator import generate, sample_id
from autocomp.latency.kernels import Kernel, extract_kernels, join_times, match_times
from autocomp.latency.microbench import benchmark_kernels

T = TypeVar("T")
#: What :func:`make_records` measures: a model, its input shape, its record id and its source.
ToMeasure = tuple[OnnxModel, tuple[int, ...], str, dict[str, Any]]

#: 3: kernel times are benchmarked on the activations the model computes (2: random ones).
RECORD_VERSION = 3
#: Timing of a whole model for a dataset: shorter than a single measurement's default, so that
#: the shipped dataset fits in 15 minutes of measurement. A neighbour's load only ever slows a
#: session down, so each model is timed in ``SESSIONS`` sessions and keeps the fastest median,
#: and its kernels are benchmarked as often and keep their fastest times.
TIMING = Timing(warmup_runs=3, warmup_s=0.1, max_warmup_s=1.0, min_runs=10, min_s=0.3, sessions=1)
SESSIONS = 2
#: Models measured together in passes, one session of each per pass, so that a model's sessions
#: lie a pass (half a minute or more) apart. On a shared host the CPU slows down for stretches of
#: 5-60 s (1.1-1.9x, all models alike): back-to-back sessions share their stretch (30 models'
#: two sessions differed by a median 2.2%, a pass apart by 7.8%), so their fastest says little
#: more than one. A killed run loses at most the group in progress.
INTERLEAVE = 30
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


def make_records(device: Device, models: Sequence[ToMeasure]) -> list[dict[str, Any]]:
    """Measure ``models`` (model, input shape, record id, source) on ``device`` and describe and
    time their kernels: one record per model.

    This machine's ``cpu`` device: ``SESSIONS`` passes over all ``models``, each timing one
    session of every model and micro-benchmarking its kernels; a record keeps the fastest session
    median and each kernel's fastest time. Other devices (remote, CUDA): one session with the
    profiler on, measured again (at most ``REMEASURE`` times, fastest median kept) while the
    median is well above the sum of the profiled node times (:func:`consistent`).
    """
    if not _benchmarkable(device):
        return [_profiled_record(device, *m) for m in models]
    threads = device.threads  # type: ignore[attr-defined]
    sessions: list[list[Measurement]] = [[] for _ in models]
    benches: list[list[tuple[list[Kernel], dict[str, float]]]] = [[] for _ in models]
    for _ in range(SESSIONS):
        for (model, shape, _, _), timed, bench in zip(models, sessions, benches, strict=True):
            timed.append(device.measure(model, shape))
            bench.append(benchmark_kernels(model, shape, threads=threads))
    records = []
    for (_, shape, rid, source), timed, bench in zip(models, sessions, benches, strict=True):
        kernels, kernel_times = fastest_kernel_times(bench)
        m = min(timed, key=lambda s: s.median_ms)
        record = _record(rid, source, shape, m, kernels)
        record["session_medians_ms"] = [s.median_ms for s in timed]
        record["kernel_times_ms"] = kernel_times
        records.append(record)
    return records


def fastest_kernel_times(
    benches: list[tuple[list[Kernel], dict[str, float]]],
) -> tuple[list[Kernel], dict[str, float]]:
    """The first benchmark's kernels, each with its fastest time over all benchmarks. Kernels
    are matched by what they compute, not by name or run order, which may change between
    sessions (see :func:`~autocomp.latency.kernels.match_times`)."""
    kernels, times = benches[0]
    best = dict(times)
    for other, other_times in benches[1:]:
        for name, t in match_times(kernels, other, other_times).items():
            best[name] = min(best[name], t)
    return kernels, best


def _profiled_record(
    device: Device,
    model: OnnxModel,
    shape: tuple[int, ...],
    rid: str,
    source: dict[str, Any],
) -> dict[str, Any]:
    """A record from a device that can only profile (see :func:`make_records`)."""
    m = device.measure(model, shape, profile=True)
    for _ in range(REMEASURE):
        if consistent(m.median_ms, m.node_times_ms):
            break
        again = device.measure(model, shape, profile=True)
        m = again if again.median_ms < m.median_ms else m
    kernels = extract_kernels(model, shape)
    record = _record(rid, source, shape, m, kernels)
    ran = list((m.node_ops or {}).items())
    record["node_times_ms"] = join_times(kernels, ran, m.node_times_ms or {})
    return record


def _record(
    rid: str, source: dict[str, Any], shape: tuple[int, ...], m: Measurement, kernels: list[Kernel]
) -> dict[str, Any]:
    """What every record holds: who measured what, how fast, and its kernels."""
    return {
        "version": RECORD_VERSION,
        "id": rid,
        "source": source,
        "input_shape": list(shape),
        "device": m.info.to_dict(),
        "ort_version": ort.__version__,
        "host": platform.node(),
        "median_ms": m.median_ms,
        "p10_ms": m.p10_ms,
        "p90_ms": m.p90_ms,
        "runs": len(m.samples),
        "kernels": [k.to_dict() for k in kernels],
    }


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

    def describe(i: int) -> ToMeasure:
        s = generate(seed, i, batch)
        return (
            s.onnx_model,
            s.input_shape,
            s.id,
            {"generator": {"seed": seed, "index": i, "config": s.config}},
        )

    return _measure_in_groups(device, out, todo, describe, f"measuring {out.name}", progress)


def _measure_in_groups(
    device: Device,
    out: Path,
    items: Sequence[T],
    describe: Callable[[T], ToMeasure],
    desc: str,
    progress: bool,
) -> int:
    """Append a record for each of ``items`` (``describe(item)``: model, input shape, record id,
    source) to ``out``, measured ``INTERLEAVE`` at a time by :func:`make_records`; how many."""
    with tqdm(total=len(items), desc=desc, unit="model", disable=not progress) as bar:
        for start in range(0, len(items), INTERLEAVE):
            group = [describe(item) for item in items[start : start + INTERLEAVE]]
            for record in make_records(device, group):
                append_record(out, record)
            bar.update(len(group))
    return len(items)


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
    models: list[ToMeasure] = []
    for p in paths:
        model = load_onnx(p)
        shape = tuple(input_shape or static_input_shape(model, p))
        digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16]
        source = {"file": str(Path(p)), "name": Path(p).stem}
        models.append((model, shape, f"file-{digest}-b{shape[0]}", source))
    done = _open_dataset(out, device.info.with_batch(models[0][1][0] if models else 1).profile)
    todo = [m for m in models if m[2] not in done]
    return _measure_in_groups(device, out, todo, lambda m: m, "measuring", progress)


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
