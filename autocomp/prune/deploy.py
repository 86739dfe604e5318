"""Export a policy's network as it computes in torch: each int8 layer quantizes its own input.

ONNX Runtime's QDQ quantizer puts one Quantize/Dequantize pair on a tensor that an int8 layer
reads, and then feeds *every* reader of that tensor from the dequantized copy: the fp32 convs
beside it and the identity branch of a residual add see quantized activations too. The torch
model (:mod:`autocomp.prune.quantize`) quantizes an int8 layer's input for that layer only, so
the two disagree wherever a tensor has readers of both kinds (measured here: 2.5% of top-1
decisions of a mixed-precision resnext26ts on digits flipped between them).

:func:`unshare_inputs` rewires the other readers of such a tensor to the float tensor, so the
exported graph computes what the torch model computes (int8 layers' outputs stay quantized for
every reader, as their output observers quantize them in torch too). Unused Q/DQ nodes go.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx


def export_policy(
    model: Any,
    candidate_or_bits: Any,
    input_shape: tuple[int, ...],
    path: str | Path,
    *,
    calibration_batches: Any,
) -> Any:
    """:func:`autocomp.quant.export.export_onnx` with :func:`unshare_inputs` applied to the graph
    before it is checked and written."""
    from autocomp.quant.export import export_onnx

    return export_onnx(
        model,
        candidate_or_bits,
        input_shape,
        path,
        calibration_batches=calibration_batches,
        rewrite=unshare_inputs,
    )


def unshare_inputs(graph: onnx.ModelProto, quantized: Iterable[str]) -> int:
    """Feed the readers of a quantized *input* that are not int8 layers from the float tensor,
    in place; returns how many inputs were rewired. ``quantized`` are the int8 nodes' names."""
    int8 = set(quantized)
    nodes = graph.graph.node
    producer = {out: n for n in nodes for out in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    rewired = 0
    for q in [n for n in nodes if n.op_type == "QuantizeLinear"]:
        source = q.input[0]
        made_by = producer.get(source)
        if made_by is not None and made_by.name in int8:
            continue  # an int8 layer's output: quantized for every reader, in torch too
        for dq in readers.get(q.output[0], []):
            if dq.op_type != "DequantizeLinear":
                continue
            for reader in readers.get(dq.output[0], []):
                if reader.name in int8 or reader.op_type == "QuantizeLinear":
                    continue
                for k, name in enumerate(reader.input):
                    if name == dq.output[0]:
                        reader.input[k] = source
                        rewired += 1
    if rewired:
        _drop_unused(graph)
    return rewired


def _drop_unused(graph: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes whose outputs nobody reads (repeated: a Q feeding only a dead DQ)."""
    outputs = {o.name for o in graph.graph.output}
    while True:
        read = {i for n in graph.graph.node for i in n.input} | outputs
        dead = [
            n
            for n in graph.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            and not any(o in read for o in n.output)
        ]
        if not dead:
            return
        for n in dead:
            graph.graph.node.remove(n)
