"""ONNX Runtime devices: the ``cpu`` device (CPUExecutionProvider) and ONNX models on ``cuda``.

Sessions are configured for *comparable* numbers rather than peak throughput: ``threads``
intra-op threads (default 1, the most stable setting on a shared machine), one inter-op thread,
sequential execution and every graph optimisation ONNX Runtime has (``ORT_ENABLE_ALL``), as a
deployment would use. Inputs are random, of the model's own input type. With one thread the
whole run happens in the calling thread and samples are its CPU time (see ``timing``), which keeps
medians steady on a shared machine; ``info.extra["clock"]`` says which clock was used. The timed
runs are split over ``timing.sessions`` fresh sessions, as fresh sessions differ (see ``timing``).

With ``profile=True`` another session runs with ONNX Runtime's profiler on, *after* the timed
runs, so profiling overhead never reaches the reported median. Node names are those ONNX Runtime
executes, i.e. after its fusions and layout changes (``conv1_nchwc``, ``ReorderOutput`` ...).
"""

from __future__ import annotations

import bisect
import json
import platform
import statistics
import tempfile
from collections import defaultdict
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from autocomp.errors import AutocompError
from autocomp.hardware.base import DeviceInfo, Measurement, OnnxModel
from autocomp.hardware.onnx_io import model_source, one_line
from autocomp.hardware.reference import (
    CALIBRATION_TIMING,
    REFERENCE_SHAPE,
    nominal_ms,
    reference_model,
    scaled,
)
from autocomp.hardware.timing import (
    DEFAULT_TIMING,
    Timing,
    cpu_model,
    summarize,
    time_alternating,
    time_runs,
)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

#: Runs of the profiling session before the ones whose node times are kept.
PROFILE_WARMUP_RUNS = 3


class OrtDevice:
    """Times ONNX models with ONNX Runtime on the CPU or, with ``cuda=N``, on GPU ``N``."""

    def __init__(
        self, threads: int = 1, *, cuda: int | None = None, timing: Timing = DEFAULT_TIMING
    ):
        if threads < 1:
            raise AutocompError(f"threads must be at least 1, got {threads}")
        self.threads = threads
        self.cuda = cuda
        self.timing = timing
        self.clock = timing.resolve_clock(in_calling_thread=cuda is None and threads == 1)
        self.provider = CPU if cuda is None else CUDA
        if timing.reference and self.clock != "thread":
            raise AutocompError(
                "reference timing needs the thread clock: the cpu device with one thread"
            )
        if self.provider not in ort.get_available_providers():
            raise AutocompError(
                f"this onnxruntime build has no {self.provider} (it has "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
            )

    @cached_property
    def info(self) -> DeviceInfo:
        """Who measures (batch 1; a measurement reports the batch it actually used)."""
        if self.cuda is None:
            kind, processor, precisions = "cpu", cpu_model(), ("fp32", "int8")
        else:
            import torch

            kind, processor = "cuda", torch.cuda.get_device_name(self.cuda)
            precisions = ("fp32", "fp16", "int8")
        return DeviceInfo(
            kind=kind,
            runtime="onnxruntime",
            runtime_version=ort.__version__,
            processor=processor,
            threads=self.threads,
            batch=1,
            provider=self.provider,
            precisions=precisions,
            machine=platform.machine(),
            extra={
                "clock": self.clock,
                **({"timing": "reference"} if self.timing.reference else {}),
            },
        )

    def measure(
        self, onnx_model: OnnxModel, input_shape: tuple[int, ...], *, profile: bool = False
    ) -> Measurement:
        """Median, p10, p90 and every sample (ms) of ``onnx_model`` on an ``input_shape`` input."""
        source = model_source(onnx_model)
        shape = tuple(int(d) for d in input_shape)
        runs = [self._time_session(source, shape) for _ in range(self.timing.sessions)]
        median, p10, p90 = summarize(*runs)
        samples = [t for session_samples in runs for t in session_samples]
        node_times = node_ops = None
        if profile:
            # About a second of profiled runs, within [10, 100] runs.
            profiled_runs = min(100, max(10, round(1000.0 / max(median, 1e-3))))
            node_times, node_ops = self._profile(source, shape, profiled_runs)
        return Measurement(
            median_ms=median,
            p10_ms=p10,
            p90_ms=p90,
            samples=tuple(samples),
            info=self.info.with_batch(input_shape[0]),
            node_times_ms=node_times,
            node_ops=node_ops,
        )

    def _time_session(self, source: str | bytes, shape: tuple[int, ...]) -> list[float]:
        """Samples (ms) of one fresh session's share of the timed runs."""
        session = self._session(source)
        feed = _random_feed(session, shape)
        _run_checked(session, feed)
        share = self.timing.per_session()
        if not self.timing.reference:
            return time_runs(lambda: session.run(None, feed), share, clock=self.clock)
        ref_session = self._session(self._reference_bytes)
        ref_feed = _random_feed(ref_session, REFERENCE_SHAPE)
        samples, reference = time_alternating(
            lambda: session.run(None, feed),
            lambda: ref_session.run(None, ref_feed),
            share,
            clock=self.clock,
        )
        return scaled(samples, reference, self._nominal_ms)

    @cached_property
    def _reference_bytes(self) -> bytes:
        return reference_model().SerializeToString()

    @cached_property
    def _nominal_ms(self) -> float:
        """The reference's calibrated time on this host (cached; calibrated on first use by
        timing it alone as ``autocomp measure`` times a model, whatever this device's timing:
        a short screening measurement could catch a slow stretch and bias every later one)."""
        plain = OrtDevice(self.threads, timing=replace(CALIBRATION_TIMING, clock=self.clock))
        return nominal_ms(
            self.info.profile,
            self._reference_bytes,
            lambda: plain.measure(self._reference_bytes, REFERENCE_SHAPE).median_ms,
        )

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 4  # fatal only: errors reach the user as AutocompError
        return options

    def _session(
        self, source: str | bytes, options: ort.SessionOptions | None = None
    ) -> ort.InferenceSession:
        providers: list[Any] = [CPU]
        if self.cuda is not None:
            providers = [(CUDA, {"device_id": self.cuda}), CPU]
        try:
            return ort.InferenceSession(source, options or self._options(), providers=providers)
        except Exception as err:
            raise AutocompError(f"ONNX Runtime cannot load the model: {one_line(err)}") from None

    def _profile(
        self, source: str | bytes, shape: tuple[int, ...], runs: int
    ) -> tuple[dict[str, float], dict[str, str]]:
        with tempfile.TemporaryDirectory(prefix="autocomp-profile-") as tmp:
            options = self._options()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / "ort")
            session = self._session(source, options)
            feed = _random_feed(session, shape)
            for _ in range(PROFILE_WARMUP_RUNS + runs):
                session.run(None, feed)
            trace = Path(session.end_profiling())
            try:
                events = json.loads(trace.read_text())
            except (OSError, ValueError) as err:
                raise AutocompError(f"unreadable ONNX Runtime profile: {one_line(err)}") from None
            finally:
                trace.unlink(missing_ok=True)
        return node_times(events, skip_runs=PROFILE_WARMUP_RUNS)


def node_times(events: Any, *, skip_runs: int = 0) -> tuple[dict[str, float], dict[str, str]]:
    """Per-node median time (ms) over runs, and each node's op type, from an ORT trace, both
    in the order the nodes ran (:func:`~autocomp.latency.kernels.join_times` relies on it).

    A node's time in one run is the sum of its kernel events inside that run's ``model_run``
    window (a node inside a loop runs several times); the first ``skip_runs`` runs are dropped.
    Events that do not look like ORT's (Chrome trace format) are ignored.
    """
    if not isinstance(events, list):
        raise AutocompError("unreadable ONNX Runtime profile: not a list of trace events")
    runs: list[tuple[float, float]] = []
    kernels: list[tuple[float, float, str, str]] = []
    for event in events:
        if not isinstance(event, dict):
            continue
        ts, dur, name = event.get("ts"), event.get("dur"), event.get("name")
        if not (isinstance(ts, int | float) and isinstance(dur, int | float)):
            continue
        if not isinstance(name, str):
            continue
        if event.get("cat") == "Session" and name == "model_run":
            runs.append((ts, ts + dur))
        elif event.get("cat") == "Node" and name.endswith("_kernel_time"):
            args = event.get("args")
            op = args.get("op_name") if isinstance(args, dict) else None
            kernels.append((ts, dur, name.removesuffix("_kernel_time"), str(op or "?")))
    runs.sort()
    kernels.sort()  # run order: the returned maps list nodes in the order they first ran
    starts = [start for start, _ in runs]
    per_run: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    ops: dict[str, str] = {}
    for ts, dur, node, op in kernels:
        run = bisect.bisect_right(starts, ts) - 1
        if run < skip_runs or ts > runs[run][1]:
            continue
        per_run[node][run] += dur / 1e3  # microseconds -> ms
        ops[node] = op
    times = {node: statistics.median(by_run.values()) for node, by_run in per_run.items()}
    return times, ops


def _random_feed(session: ort.InferenceSession, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise AutocompError(
            f"the model has {len(inputs)} inputs ({names}); "
            "only single-input models can be measured"
        )
    spec = inputs[0]
    expected = tuple(spec.shape)
    fits = len(expected) == len(shape) and all(
        not isinstance(e, int) or e <= 0 or e == s for e, s in zip(expected, shape, strict=True)
    )
    if not fits or any(d <= 0 for d in shape):
        shown = ",".join(str(e) if isinstance(e, int) else str(e or "?") for e in expected)
        raise AutocompError(
            f"input shape {','.join(map(str, shape))} does not fit the model's input "
            f"'{spec.name}' of shape ({shown})"
        )
    dtype = _NUMPY_TYPES.get(spec.type)
    if dtype is None:
        raise AutocompError(f"cannot make a random input of type {spec.type} for '{spec.name}'")
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.floating):
        value = rng.standard_normal(shape).astype(dtype)
    else:
        value = rng.integers(0, 2, size=shape).astype(dtype)  # valid as indices and as booleans
    return {spec.name: value}


def _run_checked(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> None:
    try:
        session.run(None, feed)
    except Exception as err:
        raise AutocompError(f"the model failed to run: {one_line(err)}") from None
