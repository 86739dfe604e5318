"""`autocomp compress`: dependency-aware pruning is exact and harmless where it should be, the
policy space's costs are the pruned network's, int8 layers compute as exported, and the command
runs end to end (or refuses bad input in one line, writing nothing)."""

import itertools
import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torch_pruning as tp
from torch import nn

from autocomp import api, cli
from autocomp.budget import Budget
from autocomp.data import ImageDataset, load
from autocomp.errors import AutocompError
from autocomp.finetune import FinetuneConfig, calibrate_quantizers, finetune
from autocomp.prune import finish as finish_module
from autocomp.prune.deploy import export_policy, unshare_inputs
from autocomp.prune.finish import agreement, finish, score
from autocomp.prune.pruning import ModelPruner
from autocomp.prune.quantize import QConv2d, quantizable
from autocomp.prune.space import PolicySpace
from autocomp.quant.export import export_onnx
from autocomp.quant.fake import set_quantization
from autocomp.search import choice
from autocomp.search.seeding import uniform_baselines, uniform_policies
from autocomp.spaces import Candidate
from autocomp.supernet.train import calibration_batches, evaluate, view

X32 = torch.zeros(1, 1, 32, 32)
TINY = api.Effort(supernet_epochs=1, qat_epochs=1, latency_samples=4, trials=2, finetune_epochs=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _timm(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, in_chans=1).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """timm's test_resnet trained 3 epochs on digits at 32×32 (~95% test accuracy), saved."""
    data = load("digits")
    fit = data.validation_split(0.2, seed=0)
    model = _timm("test_resnet")
    config = FinetuneConfig(epochs=3, qat_epochs=0, lr=0.05, kd_weight=0.0, patience=None)
    finetune(
        model,
        None,
        (fit.x_train, fit.y_train),
        (fit.x_test, fit.y_test),
        config,
        resolution=32,
        progress=False,
    )
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path, data


def _macs_by_hooks(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of every conv/linear call, counted from the shapes they actually ran with."""
    total = [0]

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            per = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            per = m.in_features
        total[0] += out.numel() // out.shape[0] * per * x.shape[0]

    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total[0]


def _space(model: nn.Module, **kw) -> PolicySpace:
    pruner = ModelPruner(model, X32)
    layers = [n for n, m in model.named_modules() if quantizable(m)]
    return PolicySpace("m", pruner, resolution=32, in_channels=1, layers=layers, **kw)


@pytest.mark.parametrize("name", ["test_resnet", "regnetx_002"])
def test_policy_prunes_each_group_to_its_ratio_and_costs_are_exact(name):
    model = _timm(name)
    space = _space(model)
    assert space.groups and "head.fc" not in {g.name for g in space.groups}  # classifier kept
    for seed in range(2):
        candidate = space.sample(np.random.default_rng(seed))
        net = space.build(candidate).eval()
        channels = space.channels(net)
        for g in space.groups:
            assert channels[g.name] == g.keep(candidate.widths[g.name])
        for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):  # groups stay valid
            assert conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0
        cost = space.cost(candidate)
        assert cost.macs == _macs_by_hooks(net, X32)
        assert cost.params == sum(p.numel() for p in net.parameters())
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert space.cost(space.largest()).macs == _macs_by_hooks(model, X32)
    if name == "regnetx_002":  # grouped convs: channels go alike from every group
        assert any(g.chunks > 1 for g in space.groups)


@pytest.mark.parametrize("name", ["test_resnet", "regnetx_002"])
def test_removing_dead_channels_leaves_the_function_unchanged(name):
    """Zero some channels of a group everywhere they flow; the L1 criterion must pick exactly
    those, and removing them must not change a single output."""
    model = _timm(name)
    graph = tp.DependencyGraph().build_dependency(model, X32)
    probe = ModelPruner(model, X32)
    group = max(probe.groups, key=lambda g: g.channels)
    per = group.channels // group.chunks
    drop = per - group.keep(0.5) // group.chunks
    dead = sorted(c * per + o for c in range(group.chunks) for o in range(drop))
    root = model.get_submodule(group.name)
    handler = graph.get_pruner_of_module(root).prune_out_channels
    with torch.no_grad():
        for item in graph.get_pruning_group(root, handler, dead):
            layer, idxs = item.dep.target.module, item.idxs
            if isinstance(layer, nn.Conv2d | nn.Linear):
                if graph.is_out_channel_pruning_fn(item.dep.handler):
                    layer.weight[idxs] = 0
                    if layer.bias is not None:
                        layer.bias[idxs] = 0
                elif isinstance(layer, nn.Conv2d) and layer.groups > 1:
                    size = layer.in_channels // layer.groups
                    layer.weight[:, sorted({i % size for i in idxs})] = 0
                else:
                    layer.weight[:, idxs] = 0
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.weight[idxs] = 0
                layer.bias[idxs] = 0
    pruner = ModelPruner(model, X32)
    assert pruner.group(group.name).removed(0.5) == dead
    pruned = pruner.prune({group.name: 0.5}).eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("criterion", ["taylor", "fpgm"])
def test_importance_criteria_rank_channels_their_own_way(trained, criterion):
    model, _, data = trained
    x = view(torch.as_tensor(data.x_train[:64]), 32)
    batches = [(x, torch.as_tensor(data.y_train[:64]))]
    l1 = ModelPruner(model, X32, check_ratios=())
    other = ModelPruner(model, X32, importance=criterion, gradient_batches=batches, check_ratios=())
    assert [g.name for g in other.groups] == [g.name for g in l1.groups]
    assert any(a.order != b.order for a, b in zip(other.groups, l1.groups, strict=True))
    assert other.prune({g.name: 0.5 for g in other.groups})(X32).shape == (1, 10)
    if criterion == "taylor":
        with pytest.raises(AutocompError, match="taylor importance needs training batches"):
            ModelPruner(model, X32, importance="taylor")


class _Branchy(nn.Module):
    """A data-dependent branch: tracing only ever sees one of its convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x).relu()
        x = self.a(x) if x.mean() > -1 else self.b(x)
        return self.fc(x.mean((2, 3)))


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(9, 10)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_untraceable_model_falls_back_to_bits_only_naming_the_layer():
    pruner = ModelPruner(_Branchy(), X32)
    assert pruner.groups == [] and "layer 'b' never ran while tracing" in pruner.unsupported
    space = PolicySpace(
        "branchy", pruner, resolution=32, in_channels=1, layers=["stem", "a", "b", "fc"]
    )
    assert {p.section for p in space.params} == {"bits"}
    with pytest.raises(AutocompError, match=r"fails on a \(1, 1, 32, 32\) input \(in layer 'fc'\)"):
        ModelPruner(_Broken(), X32)


@pytest.mark.parametrize("tolerance", [1.0, -1.0])
def test_finishing_trains_in_fp32_and_adds_qat_only_where_calibration_loses(
    trained, monkeypatch, tolerance
):
    """Every epoch asked for recovers the pruned network in fp32 (QAT alone, at a tenth of the
    rate, left a half-pruned network at ~18%); its int8 layers are then calibrated, and QAT
    epochs are added only where that lost more than the tolerance (forced both ways here)."""
    model, _, data = trained
    monkeypatch.setattr(finish_module, "QAT_TOLERANCE", tolerance)
    space = _space(model)
    half = {p.name: 0.5 for p in space.params if p.section == "widths"}
    candidate = space.from_values(half | {p.name: 8 for p in space.params if p.section == "bits"})
    fit = data.validation_split(0.2, seed=0)
    bn_batches = calibration_batches(fit.x_train, seed=0)
    start = score(space, space.from_values(half), bn_batches, (fit.x_test, fit.y_test))  # fp32
    net, report = finish(space, candidate, model, fit, bn_batches, epochs=1, qat_epochs=2)
    assert [e["phase"] for e in report["fp32"]["history"]] == ["fp32"]
    assert report["fp32"]["start_accuracy"] == pytest.approx(start)
    assert report["val_accuracy"] > start + 0.2 and report["val_accuracy"] > 0.5
    assert evaluate(net, (fit.x_test, fit.y_test), 32) == report["val_accuracy"]  # the one returned
    logits = net(view(torch.as_tensor(fit.x_test), 32)).detach()
    expected = -logits.log_softmax(1)[torch.arange(len(fit.y_test)), fit.y_test].mean()
    assert report["val_loss"] == pytest.approx(float(expected), rel=1e-5)  # compress's tie-break
    if tolerance > 0:
        assert "qat" not in report and report["val_accuracy"] == report["ptq_val_accuracy"]
    else:
        assert [e["phase"] for e in report["qat"]["history"]] == ["qat", "qat"]
        assert report["val_accuracy"] >= report["ptq_val_accuracy"]  # QAT kept only if better


def test_uniform_baselines_are_the_widest_uniform_policy_that_fits_per_precision(trained):
    model, _, _ = trained
    space = _space(model)
    grid = uniform_policies(space, 8)
    channels = [tuple(g.keep(next(iter(c.widths.values()))) for g in space.groups) for c in grid]
    assert grid[0] == space.largest(bits=8) and len(set(channels)) == len(grid) > 10
    for wider, narrower in itertools.pairwise(channels):  # widest first, each one narrower
        assert wider != narrower and all(w >= n for w, n in zip(wider, narrower, strict=True))
    assert all(len(set(c.widths.values())) == 1 and set(c.bits.values()) == {8} for c in grid)
    assert min(grid[-1].widths.values()) >= min(space.keep_ratios)
    off_grid = [c for c in grid if next(iter(c.widths.values())) not in space.keep_ratios]
    assert off_grid and space.check(off_grid[0]) == off_grid[0]  # finer than the search's grid

    def ms(c: Candidate) -> float:  # a device on which int8 halves the time
        calls.append(c)
        return space.cost(c).macs / 1e6 * (0.5 if 8 in c.bits.values() else 1.0)

    calls: list[Candidate] = []
    limit = 0.4 * ms(space.largest(bits=32))
    calls.clear()
    baselines = uniform_baselines(space, Budget(latency_ms=limit), ms)
    assert len(calls) <= 2 * (len(grid).bit_length() + 1)  # bisection, not a walk down the grid
    expected = [next(c for c in uniform_policies(space, b) if ms(c) <= limit) for b in (8, 32)]
    assert baselines == expected and expected[0] != expected[1]

    # A policy found by the short timing that misses when confirmed gives way to the next
    # narrower one; none is kept after 3 misses.
    def slower(c: Candidate) -> float:
        confirmations.append(c)
        return 2 * limit if c in expected else ms(c)

    confirmations: list[Candidate] = []
    confirmed = uniform_baselines(space, Budget(latency_ms=limit), ms, slower)
    narrower = [uniform_policies(space, b) for b in (8, 32)]
    assert confirmed == [g[g.index(c) + 1] for g, c in zip(narrower, expected, strict=True)]
    assert len(confirmations) == 4
    assert uniform_baselines(space, Budget(latency_ms=limit), ms, lambda c: 2 * limit) == []
    calls.clear()
    by_flops = uniform_baselines(space, Budget(flops=2 * space.cost(expected[1]).macs), ms)
    assert by_flops == [replace(expected[1], bits=expected[0].bits), expected[1]] and not calls
    assert uniform_baselines(space, Budget(latency_ms=1e-9), ms) == []
    too_wide = replace(off_grid[0], widths=dict.fromkeys(off_grid[0].widths, 1.5))
    with pytest.raises(AutocompError, match="is not a choice"):
        space.check(too_wide)


def test_int8_layers_compute_as_exported(trained, tmp_path):
    """BatchNorm folded, int8 layers fake-quantized with calibrated observers: ONNX Runtime's QDQ
    model predicts the same class as the torch model on (nearly) every test image."""
    model, _, data = trained
    space = _space(model)
    candidate = space.from_values({p.name: 8 for p in space.params if p.section == "bits"})
    net = space.build(candidate)
    space.deploy(net, candidate)
    assert isinstance(net.get_submodule("conv1.0"), QConv2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # all folded
    set_quantization(net, True)
    images = torch.as_tensor(data.x_train[:256])
    calibrate_quantizers(net, (view(b, 32) for b in images.split(64)))
    path = tmp_path / "m.onnx"
    info = export_policy(net, candidate, (1, 1, 32, 32), path, calibration_batches=[images[:64]])
    assert len(info.observed) == len(candidate.bits)  # every scale came from the observers
    assert agreement(net, info.path, (data.x_test, data.y_test), 32) >= 0.99


def test_only_int8_layers_read_their_quantized_inputs(trained, tmp_path):
    """ONNX Runtime feeds every reader of an int8 layer's input from one Q/DQ pair; the export
    rewires the others (fp32 convs, the identity branch of residual adds) to the float tensor,
    as the torch model computes them."""
    model, _, data = trained
    space = _space(model)
    bits = {"layer1.0.conv1": 8, "layer2.0.conv1": 8}  # beside fp32 downsample convs and adds
    candidate = space.from_values({f"bits.{k}": v for k, v in bits.items()})
    net = space.build(candidate)
    space.deploy(net, candidate)
    set_quantization(net, True)
    calibrate_quantizers(net, (view(b, 32) for b in torch.as_tensor(data.x_train[:256]).split(64)))
    shape, batches = (1, 1, 32, 32), [torch.as_tensor(data.x_train[:64])]
    shared = export_onnx(net, candidate, shape, tmp_path / "a.onnx", calibration_batches=batches)
    graph = onnx.load(str(shared.path))
    assert unshare_inputs(graph, shared.quantized_nodes) > 0
    own = export_policy(net, candidate, shape, tmp_path / "b.onnx", calibration_batches=batches)
    x = view(torch.as_tensor(data.x_test[:64]), 32).contiguous()
    with torch.no_grad():
        expected = net(x).numpy()

    def logits(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return np.concatenate(
            [session.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(64)]
        )

    error_shared = np.abs(logits(shared.path) - expected).mean()
    error_own = np.abs(logits(own.path) - expected).mean()
    assert error_own < 0.5 * error_shared


def _projection_net() -> nn.Module:
    """MobileNetV3's pattern: an in-place activation after one conv, then a projection conv (BN,
    no activation) feeding the next int8 conv directly; BatchNorm statistics non-trivial, and
    one nearly flat channel into the depthwise conv, whose BN folding then gives it a large
    gain (as on the 1×1 maps of MobileNetV3's last stages at 32×32)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, padding=1, groups=8),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 8, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    for bn in (net[1], net[4], net[6]):
        bn.momentum = None  # running statistics: the plain average over the batches below
    net.train()
    with torch.no_grad():
        net[1].weight[0] = 0.02
        for _ in range(4):
            net(torch.rand(32, 1, 32, 32))
    return net.eval()


def test_int8_graph_computes_what_the_torch_model_computes(tmp_path):
    """ONNX Runtime's QDQ graph, run as specified (no fusions), equals the fake-quant model up to
    float rounding: a tensor that one int8 layer outputs and the next reads is quantized once
    (the export's single Q/DQ pair), and biases lie on the int32 grid the export stores. Before,
    single-step flips from both compounded through MobileNetV3's deep int8 stack (torch/ORT
    top-1 agreement 63% on hard digits)."""
    model = _projection_net()
    space = _space(model)
    candidate = space.from_values({p.name: 8 for p in space.params if p.section == "bits"})
    net = space.build(candidate)
    space.deploy(net, candidate)
    assert net.get_submodule("5").input_quantized  # reads conv 3's quantized output as is
    assert net.get_submodule("5").in_q is net.get_submodule("3").out_q
    assert not net.get_submodule("3").input_quantized  # conv 0's output went through ReLU_
    set_quantization(net, True)
    images = torch.rand(128, 1, 32, 32)
    calibrate_quantizers(net, images.split(32))
    path = tmp_path / "m.onnx"
    info = export_policy(net, candidate, (1, 1, 32, 32), path, calibration_batches=[images])
    assert len(info.observed) == len(candidate.bits)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = torch.rand(64, 1, 32, 32)
    got = np.concatenate([session.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(64)])
    with torch.no_grad():
        expected = net(x).numpy()
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()


@pytest.mark.slow
def test_predicted_latency_is_calibrated_on_measurements(trained):
    from autocomp.hardware import Timing, get_device
    from autocomp.latency.predictors import load
    from autocomp.latency.store import default_predictor_path
    from autocomp.prune.latency import PolicyLatency

    model, _, data = trained
    space = _space(model)
    device = get_device("cpu", timing=Timing(warmup_s=0.1, min_runs=10, min_s=0.2))
    probe = torch.as_tensor(data.x_train[:8])
    # Any shipped predictor: calibration is what is tested, and this host's profile may have none
    # (adapting one would time 30 models).
    predictor = load(default_predictor_path())
    lat = PolicyLatency(space, device, probe, mode="predict", predictor=predictor)
    ends = [space.largest(), space.smallest()]
    lat.calibrate(ends)
    ratios = [lat.measure(c) / lat.kernel(c) for c in ends]
    assert min(ratios) <= lat.scale_ <= max(ratios)
    middle = space.sample(np.random.default_rng(0))
    before = float(lat.predict([middle])[0])
    assert before == pytest.approx(lat.scale_ * lat.kernel(middle))
    lat.correct(middle, 2 * before)  # measured slower than expected: never expect less again
    assert float(lat.predict([middle])[0]) == pytest.approx(2 * before)
    assert lat.summary()["calibration_within_10_pct"] is not None


class _Clock:
    """A device on which every policy measures ``ms``; counts its measurements."""

    def __init__(self, ms: float) -> None:
        self.ms, self.calls = ms, 0

    def measure(self, model, shape):
        self.calls += 1
        return SimpleNamespace(median_ms=self.ms)


def test_verification_timings_are_kept_apart_from_screening_and_read_back(trained, tmp_path):
    from autocomp.prune.latency import PolicyLatency

    model, _, data = trained
    space = _space(model)
    probe = torch.as_tensor(data.x_train[:8])
    screen, full = _Clock(1.0), _Clock(1.2)
    lat = PolicyLatency(space, screen, probe, verifier=full)
    lat.attach(tmp_path / "latency.jsonl")
    policy = space.largest()
    assert (lat.measure(policy), lat.verify(policy), lat.verify(policy)) == (1.0, 1.2, 1.2)
    assert (screen.calls, full.calls) == (1, 1)  # each timing once per policy
    assert lat.predict([policy])[0] == 1.0  # the screening estimate, until corrected
    lat.correct(policy, lat.verify(policy))
    assert lat.predict([policy])[0] == pytest.approx(1.2)
    assert lat.summary()["verified"] == 1
    resumed = PolicyLatency(space, _Clock(9.0), probe, verifier=_Clock(9.0))
    resumed.attach(tmp_path / "latency.jsonl")
    assert (resumed.measure(policy), resumed.verify(policy)) == (1.0, 1.2)  # not measured again
    assert PolicyLatency(space, screen, probe).verifier is screen


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(api.Effort, "of", classmethod(lambda cls, quick: TINY))
    monkeypatch.setattr(api, "REPAIR_ROUNDS", 2)


@pytest.mark.slow
def test_compress_end_to_end(trained, tiny, tmp_path, capsys):
    model, weights, data = trained
    original_macs = _macs_by_hooks(model, X32)
    budget = f"{0.6 * original_macs / 1e6:.4f}M MACs,50ms"
    run = tmp_path / "run"
    argv = ["compress", "--model", "timm:test_resnet", "--weights", str(weights)]
    code = cli.main([*argv, "--budget", budget, "--out", str(run), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    for name in ("config.json", "study.db", "model.pt", "model.onnx", "report.json", "report.html"):
        assert (run / name).is_file(), name
    chosen = report["chosen"]
    assert report["meets_budget"] is True
    assert chosen["macs"] <= 0.6 * original_macs and chosen["flops"] == 2 * chosen["macs"]
    assert chosen["latency_ms"]["measured"]["median_ms"] <= 50
    assert chosen["size_bytes"] == (run / "model.onnx").stat().st_size
    assert abs(chosen["size_bytes_predicted"] / chosen["size_bytes"] - 1) < 0.05
    assert chosen["accuracy"]["agreement"] >= 0.98
    assert chosen["accuracy"]["onnx"] > 0.5  # pruned to 60% of the MACs, finetuned 1 epoch
    assert report["compress"]["original"]["macs"] == original_macs
    candidate = Candidate.from_dict(chosen["candidate"])
    state = torch.load(run / "model.pt", weights_only=True)
    assert Candidate.from_json(state["candidate"]) == candidate
    stages = {"analyse", "latency", "search", "baselines", "arbitration", "report"}
    assert stages <= set(report["timings_s"])
    # The search's picks were finetuned beside the widest uniform policies that meet the budget
    # (one per precision offered), and the best on validation afterwards was shipped (ties: the
    # lowest validation cross-entropy).
    table = report["arbitration"]
    baselines = [row for row in table if row["baseline"]]
    offered = json.loads((run / "config.json").read_text())["bits"]  # [32] where int8 is slower
    assert len(baselines) == len(offered) and len(table) > len(baselines)
    assert all(row["macs"] <= 0.6 * original_macs for row in baselines)
    n_val = len(data.validation_split(0.2).y_test)
    band = choice.tied_with(max(row["finetuned_val_accuracy"] for row in table), n_val)
    tied = [row for row in table if row["finetuned_val_accuracy"] >= band]
    assert min(tied, key=lambda row: row["finetuned_val_loss"])["key"] == candidate.key()
    winner = [row for row in table if row.get("chosen")]
    assert [row["key"] for row in winner] == [candidate.key()]
    assert winner[0]["finetuned_val_accuracy"] == chosen["accuracy"]["finetuned_val"]
    # The same folder again is refused without --resume, and nothing changes.
    before = sorted(p.name for p in run.iterdir())
    assert cli.main([*argv, "--budget", "50ms", "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.slow
def test_model_the_pruner_cannot_follow_is_searched_over_bits_only(tiny, tmp_path, monkeypatch):
    carve, splits = ImageDataset.validation_split, []
    monkeypatch.setattr(
        ImageDataset,
        "validation_split",
        lambda *a, **k: splits.append(carve(*a, **k)) or splits[-1],
    )
    result = api.compress(
        _Branchy(),
        "digits",
        "1M MACs,50ms",
        example_input=torch.zeros(1, 1, 16, 16),
        out=tmp_path / "run",
        seed=3,
        progress=False,
    )
    # Whatever the seed, selection uses the one validation split a model can be trained without.
    held_out = carve(load("digits"), 0.2)
    assert splits and all(np.array_equal(s.x_test, held_out.x_test) for s in splits)
    report = json.loads((result.run_dir / "report.json").read_text())
    assert result.meets_budget and report["chosen"]["macs"] <= 1_000_000
    assert "layer 'b' never ran while tracing" in report["compress"]["unsupported"]
    assert any(n.startswith("bits-only search: ") and "'b'" in n for n in report["notes"])
    assert report["chosen"]["candidate"]["widths"] == {}
    assert set(report["chosen"]["candidate"]["bits"]) == {"stem", "a"}  # ran, not the classifier


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["--model", "timm:resnet99"], "unknown timm model 'resnet99'"),
        (["--model", "resnet18"], "unknown model 'resnet18'; use 'timm:NAME'"),
        (["--model", "timm:test_resnet", "--weights", "nope.pt"], "weights file not found"),
        (["--model", "timm:test_resnet", "--weights", "BAD"], "cannot read weights"),
        (["--model", "timm:test_efficientnet", "--weights", "GOOD"], "do not fit the model"),
        (["--model", "timm:test_resnet", "--keep-ratios", "0,1"], "must lie in (0, 1]"),
        (["--model", "timm:test_resnet", "--budget", "1k params"], "smallest achievable"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(trained, extra, phrase, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    extra = [{"BAD": str(bad), "GOOD": str(trained[1])}.get(a, a) for a in extra]
    budget = [] if "--budget" in extra else ["--budget", "5ms"]
    run = tmp_path / "never"
    assert cli.main(["compress", *budget, *extra, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("autocomp: error: ") and phrase in err
    assert not run.exists()
