"""Kernel micro-benchmarks: each kernel ONNX Runtime executes for a model, timed on its own.

Why not the profiler: ORT's profiler times nodes with the wall clock, so on a shared machine a
node that was descheduled for another process is charged the other process's time. Large
kernels (tens of ms) are descheduled in *every* run, and their profiled times were up to 4x the
truth on the 2-core machine this was written on. Here every executed node of the optimized graph
(after ORT's fusions and layout changes: ``nchwc`` convolutions, ``QLinearConv``, reorders...)
becomes a one-node model that runs with graph optimisations off, i.e. exactly that kernel, and is
timed with the calling thread's CPU clock at one thread (wall clock with more threads), the
clock the ``cpu`` device uses for whole models. This is nn-Meter's kernel-level measurement,
with the kernels read from the runtime instead of guessed.

Inputs are the values each kernel sees inside the model, for one random input image; weights,
scales and shape tensors are the model's own. Values matter: ORT's uint8 ``MaxPool`` is branchy,
and on random 0/1 bytes it timed 1.7x faster than on the model's own quantized activations (four
stem pools of generated models, both ways interleaved in one run); no other kernel type moved.
Outputs are pre-bound, so no copy is timed; the cost of one empty call (an ``Identity`` of one
element) is subtracted. Every kernel is timed in ``passes`` interleaved passes and keeps its
fastest pass median: a neighbour's load only ever slows a pass down. Each kernel's session lives
only while it is timed: with several threads a live session's workers spin and take the cores.
"""

from __future__ import annotations

import gc
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from autocomp.errors import AutocompError
from autocomp.hardware.base import OnnxModel
from autocomp.hardware.onnx_io import one_line
from autocomp.latency.kernels import Kernel, optimized_kernels

T = TypeVar("T")

_NUMPY = {
    "float": np.float32,
    "float32": np.float32,
    "float64": np.float64,
    "double": np.float64,
    "float16": np.float16,
    "uint8": np.uint8,
    "int8": np.int8,
    "int32": np.int32,
    "int64": np.int64,
    "bool": np.bool_,
}


@dataclass(frozen=True)
class BenchTiming:
    """Runs per kernel and pass: a warm-up run, then at least ``min_runs`` and ``min_s``."""

    passes: int = 2
    min_runs: int = 3
    min_s: float = 0.002
    max_runs: int = 50


def _options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return options


def _match_nodes(kernels: list[Kernel], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The optimized-graph node of each kernel: by name, and unnamed nodes (which ORT names
    ``OpType_index`` at run time) in order within their op type."""
    named = {n.name: n for n in graph.node if n.name}
    unnamed: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        if not n.name:
            unnamed[n.op_type].append(n)
    out = []
    for k in kernels:
        node = named.get(k.name)
        if node is None and unnamed[k.op]:
            node = unnamed[k.op].pop(0)
        if node is None:
            raise AutocompError(f"kernel {k.name!r} ({k.op}) is not in the optimized graph")
        out.append(node)
    return out


def _random(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    np_type = _NUMPY.get(dtype)
    if np_type is None:
        raise AutocompError(f"cannot make a random {dtype} tensor for a kernel benchmark")
    if np.issubdtype(np_type, np.floating):
        return rng.standard_normal(shape).astype(np_type)
    return rng.integers(0, 2, size=shape).astype(np_type)


def _real_values(
    optimized: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray], threads: int
) -> dict[str, np.ndarray]:
    """The tensors ``names`` as the model computes them from ``feed``."""
    if not names:
        return {}
    model = onnx.ModelProto()
    model.CopyFrom(optimized)
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = ort.InferenceSession(
        model.SerializeToString(), _options(threads), providers=["CPUExecutionProvider"]
    )
    return dict(zip(names, session.run(names, feed), strict=True))


def _kernel_call(
    node: onnx.NodeProto,
    kernel: Kernel,
    optimized: onnx.ModelProto,
    weights: dict[str, onnx.TensorProto],
    values: dict[str, np.ndarray],
    threads: int,
) -> Callable[[], None]:
    """A zero-argument callable that runs ``node`` alone on bound inputs and outputs."""
    inputs = [v for v in node.input if v and v not in weights]
    graph = helper.make_graph(
        [node],
        "kernel",
        [
            helper.make_tensor_value_info(
                v, helper.np_dtype_to_tensor_dtype(values[v].dtype), values[v].shape
            )
            for v in inputs
        ],
        [onnx.ValueInfoProto(name=o) for o in node.output if o],
        [weights[v] for v in dict.fromkeys(node.input) if v in weights],
    )
    model = helper.make_model(graph, opset_imports=optimized.opset_import)
    model.ir_version = optimized.ir_version
    session = ort.InferenceSession(
        model.SerializeToString(), _options(threads), providers=["CPUExecutionProvider"]
    )
    binding = session.io_binding()
    for v in inputs:
        binding.bind_cpu_input(v, values[v])
    outputs = [o for o in node.output if o]
    if len(outputs) == len(kernel.outputs):
        for o, t in zip(outputs, kernel.outputs, strict=True):
            buffer = np.empty(t.shape, dtype=_NUMPY.get(t.dtype, np.float32))
            binding.bind_ortvalue_output(o, ort.OrtValue.ortvalue_from_numpy(buffer))
    else:
        for o in outputs:
            binding.bind_output(o)
    run = session.run_with_iobinding
    run(binding)  # loads lazily initialised state (packed weights) before any timing

    def call() -> None:
        run(binding)

    return call


def _empty_call(threads: int) -> Callable[[], None]:
    node = helper.make_node("Identity", ["x"], ["y"], name="empty")
    graph = helper.make_graph(
        [node],
        "empty",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(
        model.SerializeToString(), _options(threads), providers=["CPUExecutionProvider"]
    )
    binding = session.io_binding()
    binding.bind_cpu_input("x", np.zeros(1, np.float32))
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32)))
    return lambda: session.run_with_iobinding(binding)


def _or_error(make: Callable[[], T]) -> T:
    """``make()`` (an ONNX Runtime session's work), its failures as one-line errors."""
    try:
        return make()
    except AutocompError:
        raise
    except Exception as err:
        raise AutocompError(f"cannot benchmark the model's kernels: {one_line(err)}") from None


def _time(call: Callable[[], None], timing: BenchTiming, clock: Callable[[], int]) -> float:
    """Median ms of timed runs after one warm-up run."""
    call()
    samples: list[float] = []
    total = 0.0
    while len(samples) < timing.max_runs and (
        len(samples) < timing.min_runs or total < timing.min_s
    ):
        t0 = clock()
        call()
        dt = (clock() - t0) / 1e9
        samples.append(dt)
        total += dt
    return float(np.median(samples)) * 1e3


def benchmark_kernels(
    model: OnnxModel,
    input_shape: tuple[int, ...],
    *,
    threads: int = 1,
    timing: BenchTiming = BenchTiming(),
    seed: int = 0,
) -> tuple[list[Kernel], dict[str, float]]:
    """The kernels ORT executes for ``model`` (as :func:`~autocomp.latency.kernels.
    extract_kernels` lists them) and each one's own time in ms, by kernel name."""
    kernels, optimized = optimized_kernels(model, input_shape, threads)
    nodes = _match_nodes(kernels, optimized.graph)
    weights = {t.name: t for t in optimized.graph.initializer}
    rng = np.random.default_rng(seed)
    graph_inputs = [i for i in optimized.graph.input if i.name not in weights]
    if len(graph_inputs) != 1:
        raise AutocompError(f"kernel benchmarks need a single-input model, not {len(graph_inputs)}")
    graph_input = graph_inputs[0]
    computed = [
        v for n in nodes for v in n.input if v and v not in weights and v != graph_input.name
    ]
    input_type = helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
    feed = {graph_input.name: _random(np.dtype(input_type).name, tuple(input_shape), rng)}
    values = dict(feed)
    values.update(
        _or_error(lambda: _real_values(optimized, list(dict.fromkeys(computed)), feed, threads))
    )
    clock = time.thread_time_ns if threads == 1 else time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        # One live session at a time: with several threads each session owns a thread pool
        # whose workers spin after every run, stealing the cores from the next kernel's timing
        # (at 2 threads a model's kernels summed to 3x the model itself while all were alive).
        # Passes go over all kernels, so a neighbour's burst of load spoils one pass of each.
        best = np.full(len(nodes), np.inf)
        overhead = np.inf
        for _ in range(max(1, timing.passes)):
            overhead = min(overhead, _time(_or_error(lambda: _empty_call(threads)), timing, clock))
            for i, (node, kernel) in enumerate(zip(nodes, kernels, strict=True)):
                call = _or_error(
                    lambda n=node, k=kernel: _kernel_call(n, k, optimized, weights, values, threads)
                )
                best[i] = min(best[i], _time(call, timing, clock))
                del call
    finally:
        if gc_was_enabled:
            gc.enable()
    times = np.maximum(best - overhead, 0.1 * best)
    return kernels, {k.name: float(t) for k, t in zip(kernels, times, strict=True)}
