"""Tiny ONNX graphs for device tests, built with onnx.helper (no exporter, no randomness)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

OPSET = helper.make_opsetid("", 17)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[OPSET])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_net(batch: int | str = 1, size: int = 32, width: int = 8) -> onnx.ModelProto:
    """Conv -> Relu -> Conv on a ``batch x 3 x size x size`` input (``batch`` may be symbolic)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((width, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((width, width, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name="relu1"),
        helper.make_node("Conv", ["b", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width, size, size])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return _model(graph)


def embedding(vocab: int = 16, dim: int = 4) -> onnx.ModelProto:
    """Gather rows of a table by int64 indices: an input that is not a float tensor."""
    table = np.arange(vocab * dim, dtype=np.float32).reshape(vocab, dim)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"], name="lookup")],
        "embedding",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, dim])],
        [numpy_helper.from_array(table, "table")],
    )
    return _model(graph)


def two_inputs() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"], name="add")],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return _model(graph)


def fails_at_run() -> onnx.ModelProto:
    """Valid ONNX (the checker accepts it) whose Reshape cannot work on a 1x3x32x32 input."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
        "fails_at_run",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 7])],
        [numpy_helper.from_array(np.array([5, 7], dtype=np.int64), "shape")],
    )
    return _model(graph)


def with_external_data(location: str = "weights.bin") -> onnx.ModelProto:
    """``conv_net`` whose first weight claims to live in a file next to the model."""
    model = conv_net()
    external_data_helper.set_external_data(model.graph.initializer[0], location=location)
    model.graph.initializer[0].ClearField("raw_data")
    return model
