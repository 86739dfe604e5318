"""Mixed-precision export: quantize chosen nodes of an fp32 ONNX model to int8, QDQ format.

ONNX Runtime's static quantizer does the work (``quantize_static``, QDQ format, per-channel int8
weights, uint8 activations calibrated with MinMax); this module only pins it to an exact set of
nodes, so a per-layer bit choice (searched, or drawn by the latency generator) becomes a graph in
which exactly those layers run as int8 kernels after ONNX Runtime fuses the Q/DQ pairs.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from autocomp.errors import AutocompError
from autocomp.quant.fake import reduced_int8_weights

#: Op types whose int8 variants ONNX Runtime runs fast on CPU: the per-layer bit choices.
QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which every node has a unique name (needed to select nodes)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return out


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that have an int8 choice, in graph order."""
    return [n.name for n in model.graph.node if n.op_type in QUANTIZABLE_OPS and n.name]


class _RandomReader(CalibrationDataReader):
    """Calibration batches: given arrays, or standard-normal ones of the model's input shape."""

    def __init__(self, name: str, batches: Iterable[np.ndarray]):
        self._batches = iter(batches)
        self._name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: batch}


def quantize_nodes(
    model: onnx.ModelProto,
    nodes: Sequence[str],
    *,
    input_shape: Sequence[int],
    calibration: Sequence[np.ndarray] | None = None,
    samples: int = 2,
    seed: int = 0,
    fixed_qparams: Mapping[str, tuple[float, int]] | None = None,
) -> onnx.ModelProto:
    """Quantize exactly ``nodes`` of fp32 ``model`` to int8 (QDQ); the rest stays fp32.

    ``calibration`` are input batches for activation ranges; without them, ``samples``
    standard-normal batches of ``input_shape`` are used (enough for latency, not for accuracy).
    ``fixed_qparams`` maps activation tensor names to a (scale, uint8 zero point) used instead of
    the calibrated range: the ranges that quantization-aware training learned.
    An empty ``nodes`` returns the model unchanged.
    """
    names = {n.name for n in model.graph.node}
    unknown = [n for n in nodes if n not in names]
    if unknown:
        raise AutocompError(
            f"cannot quantize unknown node(s) {', '.join(map(repr, unknown[:5]))}; the model's "
            f"quantizable nodes are: {', '.join(quantizable_nodes(model)[:10]) or 'none'}"
        )
    if not nodes:
        return model
    weights = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise AutocompError(f"quantization needs a single-input model, this one has {inputs}")
    if calibration is None:
        rng = np.random.default_rng(seed)
        shape = tuple(int(d) for d in input_shape)
        calibration = [rng.standard_normal(shape).astype(np.float32) for _ in range(samples)]
    work = onnx.ModelProto()
    work.CopyFrom(model)  # the quantizer annotates its input in place
    with tempfile.TemporaryDirectory(prefix="autocomp-qdq-") as tmp:
        out = Path(tmp) / "quantized.onnx"
        logging.disable(logging.WARNING)  # the quantizer logs advice on the root logger
        try:
            quantize_static(
                work,
                out,
                _RandomReader(inputs[0], calibration),
                quant_format=QuantFormat.QDQ,
                nodes_to_quantize=list(nodes),
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=reduced_int8_weights(),  # the fake quantizers' grid
                extra_options={"TensorQuantOverrides": _overrides(fixed_qparams or {})},
            )
        except Exception as err:
            msg = " ".join(str(err).split())[:300]
            raise AutocompError(f"int8 quantization failed: {msg}") from None
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load(str(out))


def _overrides(qparams: Mapping[str, tuple[float, int]]) -> dict[str, list[dict[str, object]]]:
    return {
        name: [{"scale": np.array(scale, np.float32), "zero_point": np.array(zero, np.uint8)}]
        for name, (scale, zero) in qparams.items()
    }
