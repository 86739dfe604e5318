"""Reading ONNX models that users hand us, with one-line errors instead of protobuf tracebacks."""

from __future__ import annotations

from pathlib import Path

import onnx

from autocomp.errors import AutocompError
from autocomp.hardware.base import OnnxModel


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message squeezed onto one line (runtimes like multi-line messages)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and validate an ONNX file; anything unreadable or invalid is an ``AutocompError``."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as err:
        raise AutocompError(f"not a valid ONNX model: {path} ({one_line(err)})") from None
    return model


def parse_onnx(data: bytes) -> onnx.ModelProto:
    """Parse and validate serialized ONNX from elsewhere (e.g. a request body).

    Nothing here executes code. Tensors stored as *external data* are refused: they name files
    that the runtime would open on this machine.
    """
    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:
        raise AutocompError(f"not a valid ONNX model ({one_line(err)})") from None
    # Before the checker, which would already look for those files.
    if any(_uses_external_data(g) for g in [model.graph, *model.functions]):
        raise AutocompError("ONNX models with external data files are not accepted")
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise AutocompError(f"not a valid ONNX model ({one_line(err)})") from None
    return model


def _uses_external_data(graph: onnx.GraphProto | onnx.FunctionProto) -> bool:
    tensors = list(getattr(graph, "initializer", []))
    for sparse in getattr(graph, "sparse_initializer", []):
        tensors += [sparse.values, sparse.indices]
    for node in graph.node:
        for attr in node.attribute:
            tensors += [attr.t, *attr.tensors]
            if any(_uses_external_data(g) for g in [attr.g, *attr.graphs]):
                return True
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors)


def model_source(model: OnnxModel) -> str | bytes:
    """What ONNX Runtime's ``InferenceSession`` takes: a path (keeps external data) or bytes."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, bytes):
        return model
    path = Path(model)
    if not path.is_file():
        raise AutocompError(f"model file not found: {path}")
    return str(path)


def model_bytes(model: OnnxModel) -> bytes:
    """Serialized ONNX, for sending a model over the wire."""
    source = model_source(model)
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    # Older exporters also list initializers (weights) as graph inputs; those are not fed.
    weights = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def static_input_shape(model: onnx.ModelProto, path: str | Path = "model") -> tuple[int, ...]:
    """The single input's shape, when the model fixes every dimension of it."""
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise AutocompError(
            f"{path}: has {len(inputs)} inputs ({names}); only single-input models can be measured"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in dims)
    if not shape or any(d <= 0 for d in shape):
        shown = ",".join(
            str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims
        )
        raise AutocompError(
            f"{path}: input '{inputs[0].name}' has dynamic shape ({shown or 'unknown'}); "
            "pass --input-shape, e.g. --input-shape 1,3,224,224"
        )
    return shape
