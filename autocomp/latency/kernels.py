"""The kernels ONNX Runtime actually executes for a model, and a feature vector for each.

Rather than guess the runtime's fusions (Conv+BN+activation, NCHWc layout with reorders, QDQ
groups into ``QLinearConv``/``QGemm``, ``QuickGelu``...), we ask ONNX Runtime: one session with
the measuring device's settings (``ORT_ENABLE_ALL``) saves its optimized graph and profiles one
run. The profile names each executed node with its op type and the shapes and element types of
its inputs and outputs; the optimized graph adds the attributes (kernel, strides, groups, fused
activation, layout). Node names are the same ones a profiling ``Device.measure`` reports, so
measured node times join kernels by name. The run is on this host and is not timed: it only
reads the graph.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from autocomp.errors import AutocompError
from autocomp.hardware.base import OnnxModel
from autocomp.hardware.onnx_io import model_source, one_line

_DTYPES = {
    "float": np.float32,
    "uint8": np.uint8,
    "int8": np.int8,
    "int64": np.int64,
    "int32": np.int32,
    "double": np.float64,
    "float16": np.float16,
    "bool": np.bool_,
}
_BYTES = {
    "float": 4,
    "double": 8,
    "float16": 2,
    "uint8": 1,
    "int8": 1,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}
_ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int64)": np.int64,
    "tensor(double)": np.float64,
}
_CONV_OPS = {"Conv", "FusedConv", "QLinearConv", "NhwcConv", "NhwcFusedConv", "ConvInteger"}
_GEMM_OPS = {
    "Gemm",
    "MatMul",
    "QGemm",
    "QLinearMatMul",
    "MatMulInteger",
    "FusedGemm",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "FusedMatMul",
}
_ACTIVATIONS = {
    "": 0,
    "Relu": 1,
    "Clip": 2,
    "HardSigmoid": 3,
    "Sigmoid": 4,
    "LeakyRelu": 5,
    "Tanh": 6,
}
_DOMAINS = {"com.microsoft.nchwc": "nchwc.", "com.microsoft": "ms.", "": "", "ai.onnx": ""}

#: Names of the columns of :func:`features`, in order.
FEATURE_NAMES = (
    "batch",
    "c_in",
    "h_in",
    "w_in",
    "c_out",
    "h_out",
    "w_out",
    "kernel_h",
    "kernel_w",
    "stride",
    "groups",
    "c_per_group",
    "depthwise",
    "macs",
    "elems_in",
    "elems_out",
    "weight_elems",
    "bytes_in",
    "bytes_out",
    "bytes_weight",
    "int8_in",
    "int8_out",
    "activation",
    "fused_sum",
    "n_inputs",
    "channels_last",
    "c_in_mod16",
    "c_out_mod16",
    "log_macs",
    "log_bytes",
    "macs_per_byte",
    "log_gemm_m",
    "log_gemm_n",
    "log_gemm_k",
)
DEPTHWISE = FEATURE_NAMES.index("depthwise")
#: Columns of :func:`feature_matrix` that describe the device profile the kernel runs under, not
#: the kernel: the same kernel takes different times on different intra-op thread counts, so
#: measurements of several thread counts can train one regressor (``transfer``).
PROFILE_NAMES = ("threads",)
#: Model-level columns appended by :func:`feature_matrix`.
CONTEXT_NAMES = ("model_log_weight_bytes", "model_log_activation_bytes", "model_kernels")
_WEIGHT_BYTES = FEATURE_NAMES.index("bytes_weight")
_IN_BYTES = FEATURE_NAMES.index("bytes_in")
_OUT_BYTES = FEATURE_NAMES.index("bytes_out")


@dataclass(frozen=True)
class Tensor:
    dtype: str  # ONNX Runtime's element type name: "float", "uint8", "int8", "int64"...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _BYTES.get(self.dtype, 4)


@dataclass(frozen=True)
class Kernel:
    """One executed node: the unit of the kernel-level latency predictor."""

    name: str
    op: str  # op type as ONNX Runtime runs it, e.g. "Conv", "QLinearConv", "ReorderInput"
    domain: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Which regressor predicts it: the op with its domain; depthwise convolutions apart."""
        key = _DOMAINS.get(self.domain, self.domain + ".") + self.op
        return key + ".dw" if self.op in _CONV_OPS and features(self)[DEPTHWISE] else key

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [[t.dtype, list(t.shape)] for t in self.inputs]
        data["outputs"] = [[t.dtype, list(t.shape)] for t in self.outputs]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Kernel:
        return cls(
            name=str(data["name"]),
            op=str(data["op"]),
            domain=str(data.get("domain", "")),
            inputs=tuple(Tensor(str(d), tuple(int(x) for x in s)) for d, s in data["inputs"]),
            outputs=tuple(Tensor(str(d), tuple(int(x) for x in s)) for d, s in data["outputs"]),
            attrs=dict(data.get("attrs", {})),
        )


def join_times(
    kernels: Sequence[Kernel], ran: Sequence[tuple[str, str]], times: Mapping[str, float]
) -> dict[str, float]:
    """``times`` (by the runtime's node name, from another session of the same model) keyed by
    the names of ``kernels``; ``ran`` lists that session's nodes as (name, op) in run order.

    ONNX Runtime names the nodes its optimizers insert from counters whose assignment varies
    between sessions, even in one process: two extractions of one model can swap the names of
    two NCHWc ``ReorderOutput`` nodes of different sizes, and a join by name then gives each the
    other's time. Where both sessions ran the same sequence of ops, times join by position;
    otherwise (another build or CPU optimised the graph differently) by name. It serves profiles,
    which give each node's op but not its tensors, so a position can still pair two parallel
    branches that ran in the other order; where the other session's kernels are known,
    :func:`match_times` joins them by what they compute.
    """
    if [op for _, op in ran] == [k.op for k in kernels]:
        pairs = zip((k.name for k in kernels), (name for name, _ in ran), strict=True)
        return {mine: times[theirs] for mine, theirs in pairs if theirs in times}
    return dict(times)


def match_times(
    kernels: Sequence[Kernel], other: Sequence[Kernel], times: Mapping[str, float]
) -> dict[str, float]:
    """``times`` of ``other`` (another session's kernels of the same model, by its node names)
    keyed by the names of ``kernels``, each kernel paired with the next one of ``other`` that
    runs the same computation (op, tensors, attributes).

    Neither names nor run order survive a new session: besides renaming the nodes it inserts,
    ORT may run two parallel branches in the other order, or optimise a few nodes differently
    (11 of 60 generated models ran another sequence of ops in a second session of one process).
    A join by position then pairs a 1x1 shortcut convolution with its branch's 3x3 one; a join by
    computation cannot, and kernels with the same computation take the same time.
    """
    waiting: dict[tuple, deque[Kernel]] = defaultdict(deque)
    for k in other:
        waiting[_computation(k)].append(k)
    out = {}
    for k in kernels:
        queue = waiting[_computation(k)]
        theirs = queue.popleft().name if queue else None
        if theirs in times:
            out[k.name] = float(times[theirs])
    return out


def _computation(k: Kernel) -> tuple:
    """What a kernel computes, without its node name: equal for the same node in two sessions."""
    return k.op, k.domain, k.inputs, k.outputs, json.dumps(k.attrs, sort_keys=True, default=str)


def _tensors(entries: Any) -> tuple[Tensor, ...]:
    out = []
    for entry in entries or []:
        for dtype, shape in entry.items():
            out.append(Tensor(str(dtype), tuple(int(d) for d in shape)))
    return tuple(out)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        elif isinstance(value, list | tuple):
            value = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value]
            if not all(isinstance(v, int | float | str) for v in value):
                continue
        elif not isinstance(value, int | float | str):
            continue
        out[attr.name] = value
    return out


def _feed(session: ort.InferenceSession, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    (spec,) = session.get_inputs()
    dtype = _ONNX_TO_NUMPY.get(spec.type, np.float32)
    return {spec.name: np.zeros(shape, dtype=dtype)}


def extract_kernels(model: OnnxModel, input_shape: tuple[int, ...]) -> list[Kernel]:
    """The kernels ONNX Runtime (CPU, ``ORT_ENABLE_ALL``) executes for ``model``, in run order."""
    return optimized_kernels(model, input_shape)[0]


def optimized_kernels(
    model: OnnxModel, input_shape: tuple[int, ...], threads: int = 1
) -> tuple[list[Kernel], onnx.ModelProto]:
    """:func:`extract_kernels` plus the optimized graph they come from (one session for both)."""
    source = model_source(model)
    with tempfile.TemporaryDirectory(prefix="autocomp-kernels-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        try:
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
            session.run(None, _feed(session, tuple(input_shape)))
        except Exception as err:
            raise AutocompError(f"ONNX Runtime cannot run the model: {one_line(err)}") from None
        events = json.loads(Path(session.end_profiling()).read_text())
        optimized = onnx.load(options.optimized_model_filepath)
    nodes = {n.name: n for n in optimized.graph.node if n.name}
    kernels = []
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node_name = name.removesuffix("_kernel_time")
        args = event.get("args", {})
        node = nodes.get(node_name)
        kernels.append(
            Kernel(
                name=node_name,
                op=str(args.get("op_name", node.op_type if node else "?")),
                domain=node.domain if node else "",
                inputs=_tensors(args.get("input_type_shape")),
                outputs=_tensors(args.get("output_type_shape")),
                attrs=_attrs(node) if node else {},
            )
        )
    return kernels, optimized


def _nchw(t: Tensor, channels_last: bool) -> tuple[int, int, int, int]:
    s = t.shape
    if len(s) == 4:
        return (s[0], s[3], s[1], s[2]) if channels_last else (s[0], s[1], s[2], s[3])
    if len(s) == 3:
        return (s[0], s[1], s[2], 1)
    if len(s) == 2:
        return (s[0], s[1], 1, 1)
    if len(s) == 1:
        return (1, s[0], 1, 1)
    return (1, max(1, t.numel), 1, 1)


def features(k: Kernel) -> np.ndarray:
    """Fixed-length description of a kernel (:data:`FEATURE_NAMES`): shapes, work, traffic.

    MLAS runs a convolution as matrix products (one per group, over im2col or NCHWc blocks), so
    its speed per MAC follows their shape: M output channels of a group, N output pixels, K
    inputs per output (a group's channels times the kernel area). Total MACs hide it: a
    convolution of 8 groups runs 8 thin products, several times slower per MAC than one wide one.
    With these columns the trees predict unseen models better (cross-validated on the Intel
    host's 330 models: 89.7% within ±10% against 87.6%, MAPE 4.8% against 5.1%)."""
    channels_last = bool(k.attrs.get("channels_last", 0))
    data = [t for t in k.inputs if t.numel > 0]
    x = k.inputs[0] if k.inputs else Tensor("float", (1,))
    y = k.outputs[0] if k.outputs else Tensor("float", (1,))
    n, c_in, h_in, w_in = _nchw(x, channels_last)
    _, c_out, h_out, w_out = _nchw(y, channels_last)
    kh = kw = 1
    groups = 1
    macs = 0
    gemm = (0, 0, 0)  # (M, N, K) of each matrix product the kernel runs (per image and group)
    weight: Tensor | None = None
    if k.op in _CONV_OPS:
        weight = next((t for t in k.inputs[1:] if len(t.shape) == 4), None)
        if weight is not None:
            kh, kw = weight.shape[2], weight.shape[3]
            groups = max(1, c_in // max(1, weight.shape[1]))
        kh, kw = (k.attrs.get("kernel_shape") or [kh, kw])[:2]
        groups = int(k.attrs.get("group", groups))
        gemm = (c_out // max(groups, 1), h_out * w_out, c_in // max(groups, 1) * kh * kw)
        macs = n * c_out * h_out * w_out * gemm[2]
    elif k.op in _GEMM_OPS:
        weight = next((t for t in k.inputs[1:] if len(t.shape) == 2), None)
        inner = x.shape[-1] if x.shape else 1
        macs = y.numel * inner
        outer = y.shape[-1] if y.shape else 1
        gemm = (outer, y.numel // max(outer, 1), inner)
    elif k.op in ("MaxPool", "AveragePool") or k.op.endswith("Pool"):
        kh, kw = (k.attrs.get("kernel_shape") or [h_in // max(h_out, 1), w_in // max(w_out, 1)])[:2]
        macs = y.numel * kh * kw
    strides = k.attrs.get("strides") or [max(1, round(h_in / max(h_out, 1)))]
    bytes_weight = weight.nbytes if weight is not None else 0
    elems_in = sum(t.numel for t in data if t is not weight)
    bytes_in = sum(t.nbytes for t in data if t is not weight)
    bytes_out = sum(t.nbytes for t in k.outputs)
    total_bytes = bytes_in + bytes_out + bytes_weight
    activation = str(k.attrs.get("activation", ""))
    int8 = ("uint8", "int8")
    row = [
        n,
        c_in,
        h_in,
        w_in,
        c_out,
        h_out,
        w_out,
        kh,
        kw,
        int(strides[0]),
        groups,
        c_in // max(groups, 1),
        int(groups > 1 and groups == c_in),
        macs,
        elems_in,
        sum(t.numel for t in k.outputs),
        weight.numel if weight is not None else 0,
        bytes_in,
        bytes_out,
        bytes_weight,
        int(x.dtype in int8),
        int(y.dtype in int8),
        _ACTIVATIONS.get(activation, 7 if activation else 0),
        int(k.op in _CONV_OPS and any(t.shape == y.shape for t in k.inputs[1:])),
        len(data),
        int(channels_last),
        c_in % 16,
        c_out % 16,
        math.log2(macs + 1),
        math.log2(total_bytes + 1),
        macs / max(total_bytes, 1),
        *(math.log2(d + 1) for d in gemm),
    ]
    return np.asarray(row, dtype=np.float64)


def feature_matrix(kernels: Sequence[Kernel], threads: int = 1) -> np.ndarray:
    """Rows of :func:`features` for the kernels of *one model*, run with ``threads`` intra-op
    threads (:data:`PROFILE_NAMES`), with the model's context.

    The context columns (:data:`CONTEXT_NAMES`: the model's total weight and activation bytes,
    its kernel count) tell a kernel whether its weights and inputs are still in cache from the
    previous run: the same layer is several times faster inside a small model than a large one.
    """
    if not kernels:
        return np.zeros((0, len(FEATURE_NAMES) + len(PROFILE_NAMES) + len(CONTEXT_NAMES)))
    X = np.stack([features(k) for k in kernels])
    weights, acts = X[:, _WEIGHT_BYTES].sum(), (X[:, _IN_BYTES] + X[:, _OUT_BYTES]).sum()
    per_model = [float(threads), math.log2(weights + 1), math.log2(acts + 1), len(kernels)]
    return np.hstack([X, np.tile(per_model, (len(kernels), 1))])
