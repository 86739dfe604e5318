"""Deployable ONNX with per-layer bits realised: int8 layers as QDQ, fp32 elsewhere.

The fake-quant model itself cannot be exported (the TorchScript exporter fails on per-channel
fake quantization), so the fp32 graph is exported (BatchNorm folded into the convs) and exactly
the int8 layers' Conv/Gemm nodes are quantized by ONNX Runtime (:func:`~autocomp.quant.qdq.
quantize_nodes`): per-channel symmetric int8 weights and uint8 activations, the grid the fake
quantization trained on. Where a layer carries trained observers (``in_q``/``out_q``, as the
search spaces' layers do) their ranges become the QDQ scales, so ONNX Runtime computes on the
grid the model learned; other int8 layers are calibrated on the given training batches.

A layer name (a key of the candidate's ``bits``, i.e. a module path) is mapped to its nodes by
recording the order in which conv/linear modules run and aligning it with the graph's Conv/Gemm/
MatMul nodes, checking every pair against the exporter's scope names (``/stages.1/.../op/Conv``):
a node that the check rejects is a functional op (no module), and a module left without a node
is an error naming it, never a silently shifted mapping.
"""

from __future__ import annotations

import copy
import io
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from autocomp.errors import AutocompError
from autocomp.hardware.onnx_io import one_line
from autocomp.quant.fake import ActQuant, act_qparams, set_quantization
from autocomp.quant.qdq import QUANTIZABLE_OPS, quantize_nodes
from autocomp.spaces.candidate import Candidate
from autocomp.supernet.train import view

#: Bitwidths a layer can be exported with: ONNX Runtime's CPU kernels run int8 and fp32.
EXPORT_BITS = (8, 32)


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`export_onnx` wrote.

    ``layer_nodes`` maps every int8 layer to its ONNX node names; ``observed`` lists the int8
    layers whose activation scales came from the model's trained observers (the others were
    calibrated by ONNX Runtime on the calibration batches).
    """

    path: Path
    input_shape: tuple[int, ...]
    quantized_nodes: tuple[str, ...]
    layer_nodes: dict[str, tuple[str, ...]]
    observed: tuple[str, ...]
    size_bytes: int


def export_onnx(
    model: nn.Module,
    candidate_or_bits: Candidate | Mapping[str, int],
    input_shape: tuple[int, ...],
    path: str | Path,
    *,
    calibration_batches: Iterable[Tensor | np.ndarray],
    rewrite: Callable[[onnx.ModelProto, tuple[str, ...]], object] | None = None,
) -> ExportInfo:
    """Write ``model`` as ONNX (opset 17, input ``input``, output ``logits``) to ``path``.

    ``candidate_or_bits`` gives each layer's bits (8 or 32) by module path; layers not named stay
    fp32. ``calibration_batches`` are training-split images at any resolution (resized here), a
    few hundred are plenty. ``rewrite(graph, quantized_nodes)``, when given, edits the quantized
    graph in place before it is checked and written (``autocomp compress`` rewires shared
    inputs). ``model`` is not modified. The file is written atomically: on any error nothing is
    left at ``path`` (a file already there is kept as it was).
    """
    path = _writable(Path(path))
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise AutocompError(f"input shape must be (batch, channels, height, width), got {shape}")
    bits = dict(
        candidate_or_bits.bits if isinstance(candidate_or_bits, Candidate) else candidate_or_bits
    )
    odd = {name: b for name, b in bits.items() if b not in EXPORT_BITS}
    if odd:
        name, b = next(iter(odd.items()))
        raise AutocompError(f"layer {name!r} has {b} bits; ONNX export realises 8 and 32 only")
    net = copy.deepcopy(model).cpu().eval()
    set_quantization(net, False)  # the fp32 graph; its int8 layers are quantized by ORT below
    for name in bits:
        try:
            net.get_submodule(name)
        except AttributeError:
            raise AutocompError(f"the model has no layer {name!r} to export") from None
    int8 = [name for name, b in bits.items() if b == 8]
    calls = _op_calls(net, shape)
    graph = _export_fp32(net, shape)
    module_nodes = _align(graph, calls)
    layer_nodes = {name: _nodes_of(name, module_nodes) for name in int8}
    fixed, observed = _observed_qparams(net, graph, layer_nodes)
    quantized = tuple(n for nodes in layer_nodes.values() for n in nodes)
    if quantized:
        graph = quantize_nodes(
            graph,
            quantized,
            input_shape=shape,
            calibration=_calibration(calibration_batches, shape),
            fixed_qparams=fixed,
        )
        if rewrite is not None:
            rewrite(graph, quantized)
    data = graph.SerializeToString()
    _check_runs(data)
    _write_atomically(path, data)
    return ExportInfo(path, shape, quantized, layer_nodes, observed, len(data))


def onnx_accuracy(
    path: str | Path,
    dataset_split: tuple[np.ndarray | Tensor, np.ndarray | Tensor],
    resolution: int,
    *,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of the ONNX model at ``path`` on ``(images, labels)``, run by ONNX Runtime.

    Images are resized to ``resolution`` exactly as torch evaluation does (``train.view``), so the
    number compares with :func:`autocomp.supernet.train.evaluate`.
    """
    images, labels = dataset_split
    predicted = onnx_predictions(path, images, resolution, batch_size=batch_size)
    return float((predicted == np.asarray(labels)).mean())


def onnx_predictions(
    path: str | Path, images: np.ndarray | Tensor, resolution: int, *, batch_size: int = 256
) -> np.ndarray:
    """The class ONNX Runtime predicts for each image (resized as :func:`onnx_accuracy` says):
    per-image answers, for paired comparisons of two models on the same images. A model with a
    fixed batch size is fed batches of that size (the last one padded)."""
    if not Path(path).is_file():
        raise AutocompError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise AutocompError(f"ONNX Runtime cannot load {path}: {one_line(err)}") from None
    spec = session.get_inputs()[0]
    fixed = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    step = fixed or batch_size
    predicted = []
    for xb in torch.as_tensor(images).split(step):
        feed = view(xb, resolution).contiguous().numpy()
        if fixed and len(feed) < fixed:
            feed = np.concatenate(
                [feed, np.zeros((fixed - len(feed), *feed.shape[1:]), feed.dtype)]
            )
        predicted.append(session.run(None, {spec.name: feed})[0][: len(xb)].argmax(1))
    return np.concatenate(predicted)


# ----------------------------------------------------------------------------------- pieces


def _writable(path: Path) -> Path:
    """Refuse a path that cannot receive the file, before any work is done or folder made."""
    if path.is_dir():
        raise AutocompError(f"cannot write the ONNX model to {path}: it is a directory")
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise AutocompError(f"cannot write the ONNX model to {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK):
        raise AutocompError(f"cannot write the ONNX model to {path}: {existing} is not writable")
    return path


def _op_calls(net: nn.Module, shape: tuple[int, ...]) -> list[str]:
    """Paths of the conv/linear modules in the order one forward pass runs them."""
    names = {m: n for n, m in net.named_modules()}
    calls: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: calls.append(names[mod]))
        for m in net.modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
    ]
    try:
        with torch.no_grad():
            net(torch.zeros(shape))
    except Exception as err:
        raise AutocompError(f"the model fails on a {shape} input: {one_line(err)}") from None
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _export_fp32(net: nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    """TorchScript export, constants folded (BatchNorm into the convs), static input shape."""
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (torch.zeros(shape),),
                buf,
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
                do_constant_folding=True,
            )
    except Exception as err:
        raise AutocompError(f"ONNX export failed: {one_line(err)}") from None
    return onnx.load_model_from_string(buf.getvalue())


def _in_scope(node: str, module: str) -> bool:
    """Whether the exporter's node name ``/a/b.0/c/op/Conv`` can belong to module ``b.0.c.op``.

    Scope parts are each a dotted run of the module path (containers that are never called, such
    as ``ModuleDict``, leave no part), and the last one ends it.
    """
    parts = [p for p in node.split("/")[:-1] if p]
    dotted = f".{module}."
    return (
        bool(parts) and dotted.endswith(f".{parts[-1]}.") and all(f".{p}." in dotted for p in parts)
    )


def _align(graph: onnx.ModelProto, calls: list[str]) -> list[tuple[str, str]]:
    """(module path, node name) for every conv/linear call, in order (see the module docstring)."""
    nodes = [n.name for n in graph.graph.node if n.op_type in QUANTIZABLE_OPS]
    pairs, i = [], 0
    for module in calls:
        while i < len(nodes) and not _in_scope(nodes[i], module):
            i += 1
        if i == len(nodes):
            raise AutocompError(
                f"cannot find the ONNX node of layer {module!r} in the exported graph"
            )
        pairs.append((module, nodes[i]))
        i += 1
    return pairs


def _nodes_of(layer: str, module_nodes: list[tuple[str, str]]) -> tuple[str, ...]:
    nodes = tuple(n for m, n in module_nodes if m == layer or m.startswith(layer + "."))
    if not nodes:
        raise AutocompError(f"layer {layer!r} has no Conv/Gemm/MatMul node to quantize")
    return nodes


def _observed_qparams(
    net: nn.Module, graph: onnx.ModelProto, layer_nodes: dict[str, tuple[str, ...]]
) -> tuple[dict[str, tuple[float, int]], tuple[str, ...]]:
    """(scale, zero point) of each int8 layer's input and output tensors from its observers.

    A layer qualifies when it runs as one node and both observers have seen data; its input
    observer gives the node's input tensor, its output one (after BatchNorm, before the
    activation, i.e. the folded Conv's output) the node's output. A tensor that two layers share
    keeps the first layer's scale (their observers watched the same values).
    """
    by_name = {n.name: n for n in graph.graph.node}
    fixed: dict[str, tuple[float, int]] = {}
    observed = []
    for layer, nodes in layer_nodes.items():
        module = net.get_submodule(layer)
        quantizers = (getattr(module, "in_q", None), getattr(module, "out_q", None))
        if len(nodes) != 1 or not all(
            isinstance(q, ActQuant) and bool(q.initialized) for q in quantizers
        ):
            continue
        node = by_name[nodes[0]]
        for tensor, q in zip((node.input[0], node.output[0]), quantizers, strict=True):
            scale, zero = act_qparams(q.min_val, q.max_val, 8)
            fixed.setdefault(tensor, (float(scale), int(zero)))
        observed.append(layer)
    return fixed, tuple(observed)


def _calibration(
    batches: Iterable[Tensor | np.ndarray], shape: tuple[int, ...]
) -> list[np.ndarray]:
    """Images resized to the input's side and regrouped into batches of the input's size."""
    images = [view(torch.as_tensor(b), shape[2]).contiguous() for b in batches]
    if not images:
        raise AutocompError("int8 export needs at least one calibration batch")
    x = torch.cat(images)
    if tuple(x.shape[1:]) != shape[1:]:
        raise AutocompError(
            f"calibration images of shape {tuple(x.shape[1:])} do not fit the input {shape}"
        )
    whole = len(x) // shape[0] * shape[0] or shape[0]
    if len(x) < whole:
        x = x.repeat(-(-whole // len(x)), 1, 1, 1)
    return [b.numpy() for b in x[:whole].split(shape[0])]


def _check_runs(data: bytes) -> None:
    """The written model must load in ONNX Runtime: never hand back a file that cannot run."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise AutocompError(f"the exported model does not load: {one_line(err)}") from None


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the target folder, then rename: readers see the old file or the new one.

    The temp file is opened like any new file (not with ``mkstemp``'s owner-only mode), so the
    model gets the usual permissions.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise AutocompError(f"cannot write the ONNX model to {path}: {one_line(err)}") from None
