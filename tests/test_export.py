"""Mixed-precision ONNX export: fp32 equivalence, exactly the int8 layers as QDQ, accuracy kept."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import trained_tiny as tt
from tiny_spaces import tiny_space
from torch import nn

from autocomp.errors import AutocompError
from autocomp.quant.export import export_onnx, onnx_accuracy, onnx_predictions
from autocomp.quant.fake import act_qparams, set_quantization
from autocomp.supernet.train import evaluate, view

SHAPE = (1, 1, tt.RESOLUTION, tt.RESOLUTION)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calibration():
    return [torch.from_numpy(tt.splits()[0][0][:128])]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, calibration):
    """The trained student (9 of 18 layers int8) exported once for the structural tests."""
    path = tmp_path_factory.mktemp("export") / "mixed.onnx"
    info = export_onnx(
        tt.student(), tt.student_candidate(), SHAPE, path, calibration_batches=calibration
    )
    return info, onnx.load(str(path))


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": xb[None].numpy()})[0] for xb in x])


def test_fp32_export_matches_torch(tmp_path, calibration):
    candidate = tt.student_candidate()
    model = tt.student()  # fake quantization on: the export must still write the fp32 graph
    fp32 = dict.fromkeys(candidate.bits, 32)
    info = export_onnx(model, fp32, SHAPE, tmp_path / "m.onnx", calibration_batches=calibration)
    graph = onnx.load(str(info.path)).graph
    assert info.quantized_nodes == () and info.layer_nodes == {} and info.observed == ()
    assert info.size_bytes == info.path.stat().st_size
    assert {n.op_type for n in graph.node}.isdisjoint({"BatchNormalization", "QuantizeLinear"})
    x = view(torch.from_numpy(tt.splits()[2][0][:32]), tt.RESOLUTION).contiguous()
    reference = tt.build(dataclasses.replace(candidate, bits=fp32), tt.student_state()).eval()
    with torch.no_grad():
        expected = reference(x).numpy()
    assert np.abs(run(info.path, x) - expected).max() <= 1e-4
    assert model.get_submodule("classifier").quantized  # the caller's model is untouched


def _producers(graph):
    return {out: n for n in graph.node for out in n.output}


def _consumers(graph):
    found = {}
    for n in graph.node:
        for name in n.input:
            found.setdefault(name, []).append(n)
    return found


def test_exactly_the_int8_layers_are_qdq(mixed):
    info, model = mixed
    graph = model.graph
    bits = tt.student_candidate().bits
    int8 = {name for name, b in bits.items() if b == 8}
    assert set(info.layer_nodes) == int8 and set(info.observed) == int8
    assert all(len(nodes) == 1 for nodes in info.layer_nodes.values())
    assert info.layer_nodes["head.conv"] == ("/conv/op/Conv",)  # through the ModuleDict
    assert info.layer_nodes["classifier"] == ("/classifier/op/Gemm",)
    produced, consumed = _producers(graph), _consumers(graph)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == len(bits)
    quantized = []
    for node in layers:
        weight = produced.get(node.input[1])
        if weight is not None and weight.op_type == "DequantizeLinear":
            quantized.append(node.name)
            assert produced[node.input[0]].op_type == "DequantizeLinear"
            assert [c.op_type for c in consumed[node.output[0]]] == ["QuantizeLinear"]
        else:  # fp32: its weight is a float initializer
            assert weights[node.input[1]].dtype == np.float32
    assert sorted(quantized) == sorted(info.quantized_nodes)
    assert len(quantized) == len(int8) == 9
    ops = [n.op_type for n in graph.node]

    # Per int8 layer: its weight's and its bias's DequantizeLinear; per activation tensor a pair.
    def original(tensor):  # the float tensor behind a Q → DQ pair
        return produced[produced[tensor].input[0]].input[0]

    tensors = {
        t for n in layers if n.name in quantized for t in (original(n.input[0]), n.output[0])
    }
    assert ops.count("QuantizeLinear") == len(tensors)
    assert ops.count("DequantizeLinear") == len(tensors) + 2 * len(int8)


def test_trained_ranges_become_the_qdq_scales(mixed):
    info, model = mixed
    graph = model.graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    node = next(n for n in graph.node if n.name == info.layer_nodes["stages.0.0.dw"][0])
    dequantize = _producers(graph)[node.input[0]]
    (quantize,) = _consumers(graph)[node.output[0]]
    layer = tt.student().get_submodule("stages.0.0.dw")
    for q, observer in ((dequantize, layer.in_q), (quantize, layer.out_q)):
        scale, zero = act_qparams(observer.min_val, observer.max_val)
        assert float(inits[q.input[1]]) == pytest.approx(float(scale), rel=1e-6)
        assert int(inits[q.input[2]]) == int(zero)


def test_int8_onnx_accuracy_within_half_a_point_of_fake_quant_torch(mixed):
    """All 1797 digits (0.5 point = 9 images): the export's fidelity, not generalisation."""
    info, _ = mixed
    full = tt.digits()[0]
    split = (
        np.concatenate([full.x_train, full.x_test]),
        np.concatenate([full.y_train, full.y_test]),
    )
    student = tt.student()
    torch_accuracy = evaluate(student, split, tt.RESOLUTION)
    onnx_acc = onnx_accuracy(info.path, split, tt.RESOLUTION)
    assert torch_accuracy > 0.9
    assert abs(onnx_acc - torch_accuracy) <= 0.005
    x = view(torch.from_numpy(split[0][:300]), tt.RESOLUTION).contiguous()
    with torch.no_grad():
        agree = (run(info.path, x).argmax(1) == student(x).argmax(1).numpy()).mean()
    assert agree >= 0.98


def test_layer_mapping_in_another_family_and_a_plain_module(tmp_path):
    rng = np.random.default_rng(3)
    space = tiny_space("resnet-bottleneck", tmp_path, num_classes=10, in_channels=1)
    candidate = dataclasses.replace(space.sample(rng), resolution=16)
    int8 = dict.fromkeys(candidate.bits, 8)
    x = [torch.randn(8, 1, 16, 16)]
    info = export_onnx(
        space.build(candidate), int8, SHAPE, tmp_path / "r.onnx", calibration_batches=x
    )
    nodes = [n for ns in info.layer_nodes.values() for n in ns]
    assert len(nodes) == len(set(nodes)) == len(candidate.bits)
    assert info.observed == ()  # never trained: ONNX Runtime calibrated every range
    for layer, (node,) in info.layer_nodes.items():
        assert node.endswith(("/op/Conv", "/op/Gemm")) and layer.split(".")[-1] in node
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3))
    info = export_onnx(plain, {"0": 32, "3": 8}, SHAPE, tmp_path / "p.onnx", calibration_batches=x)
    assert info.layer_nodes == {"3": ("/3/Gemm",)}


def test_failed_export_leaves_the_old_file_and_nothing_else(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    three_channels = [torch.randn(4, 3, 16, 16)]
    with pytest.raises(AutocompError, match="do not fit the input"):
        export_onnx(
            tt.student(), tt.student_candidate(), SHAPE, path, calibration_batches=three_channels
        )
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    fresh = tmp_path / "new" / "model.onnx"
    with pytest.raises(AutocompError, match=r"^int8 export needs at least one calibration batch$"):
        export_onnx(tt.student(), tt.student_candidate(), SHAPE, fresh, calibration_batches=[])
    assert not fresh.parent.exists()


@pytest.mark.parametrize(
    ("bits", "message"),
    [
        ({"nope": 8}, "the model has no layer 'nope' to export"),
        ({"stem": 4}, "layer 'stem' has 4 bits; ONNX export realises 8 and 32 only"),
    ],
)
def test_bad_bits_are_refused(tmp_path, bits, message):
    with pytest.raises(AutocompError, match=f"^{message}$"):
        export_onnx(tt.student(), bits, SHAPE, tmp_path / "m.onnx", calibration_batches=[])
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_are_refused(tmp_path):
    model, bits = tt.student(), {"stem": 32}
    with pytest.raises(AutocompError, match=r"it is a directory$"):
        export_onnx(model, bits, SHAPE, tmp_path, calibration_batches=[])
    (tmp_path / "file").write_text("")
    with pytest.raises(
        AutocompError,
        match=r"^cannot write the ONNX model to .*file/m.onnx: .*file is not a folder$",
    ):
        export_onnx(model, bits, SHAPE, tmp_path / "file" / "m.onnx", calibration_batches=[])
    with pytest.raises(AutocompError, match=r"^ONNX model not found: .*missing.onnx$"):
        onnx_accuracy(tmp_path / "missing.onnx", tt.splits()[2], 16)
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(AutocompError, match=r"^ONNX Runtime cannot load .*bad.onnx: "):
        onnx_accuracy(tmp_path / "bad.onnx", tt.splits()[2], 16)
    with pytest.raises(AutocompError, match=r"^input shape must be \(batch, channels"):
        export_onnx(model, bits, (1, 16, 16), tmp_path / "m.onnx", calibration_batches=[])


def test_fixed_batch_model_is_fed_padded_batches(tmp_path, calibration):
    """A batch-4 export scores 10 images (the last batch padded) like torch does."""
    model = tt.student()
    info = export_onnx(
        model,
        {"stem": 32},
        (4, *SHAPE[1:]),
        tmp_path / "new" / "b4.onnx",
        calibration_batches=calibration,
    )
    split = tuple(a[:10] for a in tt.splits()[2])
    set_quantization(model, False)
    assert onnx_accuracy(info.path, split, tt.RESOLUTION) == evaluate(model, split, tt.RESOLUTION)
    with torch.no_grad():
        torch_answers = model(view(torch.as_tensor(split[0]), tt.RESOLUTION)).argmax(1).numpy()
    answers = onnx_predictions(info.path, split[0], tt.RESOLUTION)
    assert answers.shape == (10,) and (answers == torch_answers).all()


def test_model_file_is_valid_onnx(mixed):
    info, model = mixed
    onnx.checker.check_model(model)
    assert Path(info.path).stat().st_size == info.size_bytes
