"""Dynamic ops, supernet, fake quantization and extraction: exact equivalences."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_spaces import TINY, tiny_space
from torch import nn

from autocomp.quant import fake
from autocomp.quant.fake import ActQuant, act_qparams, fake_quant_weight
from autocomp.supernet.bn import recalibrate_bn
from autocomp.supernet.ops import DynamicBatchNorm2d, DynamicConv2d, DynamicLinear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(TINY))
def space(request, tmp_path_factory):
    return tiny_space(request.param, tmp_path_factory.mktemp("spaces"), num_classes=5)


def trained_supernet(space, steps=6, seed=0):
    """A supernet whose BN statistics and quantizer ranges have seen data (as after training)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = space.supernet().set_quantization(True).train()
    with torch.no_grad():
        for step in range(steps):
            c = space.largest() if step == 0 else space.sample(rng)
            c = dataclasses.replace(c, bits=dict.fromkeys(c.bits, 8))
            net.set_active(c)
            net(torch.randn(4, space.in_channels, c.resolution, c.resolution))
    return net.eval()


def test_extracted_model_equals_supernet_with_candidate_active(space):
    net = trained_supernet(space)
    rng = np.random.default_rng(1)
    worst, quantized = 0.0, 0
    for i in range(50):
        c = space.smallest() if i == 0 else space.sample(rng)
        quantized += sum(b == 8 for b in c.bits.values())
        x = torch.randn(3, space.in_channels, c.resolution, c.resolution)
        with torch.no_grad():
            expected = net.set_active(c)(x)
            model = space.build(c, net)
            assert not model.training
            got = model(x)
        assert got.shape == (3, 5)
        worst = max(worst, (got - expected).abs().max().item())
    assert worst <= 1e-4
    assert quantized > 100


def test_quantization_switch_changes_only_low_bit_layers(space):
    net = trained_supernet(space)
    c = space.largest()
    int8 = dataclasses.replace(c, bits=dict.fromkeys(c.bits, 8))
    x = torch.randn(2, space.in_channels, c.resolution, c.resolution)
    with torch.no_grad():
        fp = net.set_quantization(False).set_active(int8)(x)
        q = net.set_quantization(True)(x)
        fp32_on = net.set_active(c)(x)
        fp32_off = net.set_quantization(False)(x)
    assert torch.equal(fp, fp32_off) and torch.equal(fp32_on, fp32_off)
    # Quantization moves the output, by less than the output itself (on an AVX2-only CPU, whose
    # int8 weights have 7 bits, the tiny supernet's largest logit moves by 56% of its size).
    assert 1e-4 < (q - fp).abs().max().item() < fp.abs().max().item()
    model = space.build(int8, net.set_quantization(True))
    assert all(m.quantize for m in model.modules() if hasattr(m, "quantize"))


def test_reorder_channels_keeps_the_largest_function(space):
    net = trained_supernet(space)
    c = space.largest()
    x = torch.randn(2, space.in_channels, c.resolution, c.resolution)
    net.set_active(c).set_quantization(False)
    with torch.no_grad():
        before = net(x)
        net.reorder_channels()
        after = net(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    first = net.net.stages[1][0]
    consumer = first.project if hasattr(first, "project") else first.conv2
    importance = consumer.importance()
    assert torch.all(importance[:-1] >= importance[1:])


def test_recalibrated_supernet_matches_recalibrated_extraction(space):
    net = trained_supernet(space)
    c = space.sample(np.random.default_rng(4))
    batches = [torch.randn(4, space.in_channels, c.resolution, c.resolution) for _ in range(3)]
    model = space.build(c, net)
    recalibrate_bn(net.set_active(c), batches)
    recalibrate_bn(model, batches)
    x = torch.randn(2, space.in_channels, c.resolution, c.resolution)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), space.build(c, net)(x), atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_active_slices(space):
    net = space.supernet().train()
    c = space.smallest()
    net.set_active(c)
    out = net(torch.randn(4, space.in_channels, c.resolution, c.resolution))
    out.logsumexp(1).mean().backward()
    stem = net.net.stem.op
    cout = space.plan(c).layers["stem"].cout
    assert stem.weight.grad[:cout].abs().sum() > 0
    assert stem.weight.grad[cout:].abs().sum() == 0


def test_state_dict_round_trips_through_safetensors_and_weights_only(space, tmp_path):
    net = trained_supernet(space)
    c = space.sample(np.random.default_rng(6))
    x = torch.randn(2, space.in_channels, c.resolution, c.resolution)
    with torch.no_grad():
        expected = net.set_active(c)(x)
    save_file(net.state_dict(), tmp_path / "net.safetensors")
    torch.save(net.state_dict(), tmp_path / "net.pt")
    for state in (
        load_file(tmp_path / "net.safetensors"),
        torch.load(tmp_path / "net.pt", weights_only=True),
    ):
        fresh = space.supernet().set_quantization(True).eval()
        fresh.load_state_dict(state)
        with torch.no_grad():
            assert torch.equal(fresh.set_active(c)(x), expected)
    assert net.active == c


# -- the ops themselves ----------------------------------------------------------------------


def test_dynamic_conv_crops_kernel_and_slices_channels():
    torch.manual_seed(0)
    conv = DynamicConv2d(8, 12, 7, stride=2)
    x = torch.randn(2, 5, 9, 9)
    conv.set_active(5, 6, 3)
    expected = F.conv2d(x, conv.weight[:6, :5, 2:5, 2:5], None, 2, 1)
    torch.testing.assert_close(conv(x), expected)
    dw = DynamicConv2d(8, 8, 5, depthwise=True)
    dw.set_active(4, 4, 3)
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(dw(x), F.conv2d(x, dw.weight[:4, :, 1:4, 1:4], None, 1, 1, 1, 4))
    with pytest.raises(ValueError, match="exceeds"):
        conv.set_active(9, 6, 3)


def test_dynamic_linear_and_full_size_ops_use_the_parameter_itself():
    lin = DynamicLinear(6, 4)
    assert lin.active_weight() is lin.weight and lin.active_bias() is lin.bias
    lin.set_active(3, 2)
    x = torch.randn(5, 3)
    torch.testing.assert_close(lin(x), x @ lin.weight[:2, :3].T + lin.bias[:2])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_dynamic_batchnorm_updates_only_the_active_slice(momentum):
    torch.manual_seed(0)
    dyn = DynamicBatchNorm2d(8, momentum=momentum)
    ref = nn.BatchNorm2d(5, momentum=momentum)
    x = torch.randn(4, 5, 3, 3) * 3 + 1
    for _ in range(2):
        out = dyn(x)
        torch.testing.assert_close(out, ref(x))
    torch.testing.assert_close(dyn.running_mean[:5], ref.running_mean)
    torch.testing.assert_close(dyn.running_var[:5], ref.running_var)
    assert torch.equal(dyn.running_mean[5:], torch.zeros(3))
    dyn.eval()
    ref.eval()
    torch.testing.assert_close(dyn(x), ref(x))


@pytest.mark.parametrize("reduced", [False, True])
def test_weight_fake_quant_is_per_channel_symmetric_int8_with_straight_through_grad(
    reduced, monkeypatch
):
    # Without VNNI, ONNX Runtime's int8 kernels need 7-bit weights (reduce_range): [-64, 64].
    monkeypatch.setattr(fake, "reduced_int8_weights", lambda: reduced)
    qmax = 64 if reduced else 127
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    q = fake_quant_weight(w)
    scale = w.detach().abs().flatten(1).amax(1) / qmax
    steps = q.detach() / scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
    assert steps.abs().max() <= qmax + 1e-4
    assert sorted(steps.abs().amax((1, 2, 3)).round().tolist()) == [qmax] * 4
    assert (q - w).abs().max() <= scale.max() / 2 + 1e-6
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    four = fake_quant_weight(w.detach(), bits=4) / (scale * qmax / 7).view(-1, 1, 1, 1)
    torch.testing.assert_close(four, four.round(), atol=1e-4, rtol=0)
    assert sorted(four.abs().amax((1, 2, 3)).round().tolist()) == [7.0] * 4


def test_act_quant_observes_in_training_and_freezes_in_eval():
    fq = ActQuant(momentum=0.5)
    x = torch.linspace(-1, 3, 101)
    assert torch.equal(fq.eval()(x), x)  # no range yet: identity
    fq.train()(x)
    assert (fq.min_val.item(), fq.max_val.item()) == (-1.0, 3.0)
    fq(x * 2)
    assert (fq.min_val.item(), fq.max_val.item()) == (-1.5, 4.5)
    fq.eval()(x * 10)
    assert fq.max_val.item() == 4.5
    scale, zero = act_qparams(fq.min_val, fq.max_val)
    torch.testing.assert_close(scale, torch.tensor(6.0 / 255))
    assert zero.item() == round(1.5 / (6.0 / 255))
    y = fq(x)
    torch.testing.assert_close(y, (torch.round(x / scale) + zero).clamp(0, 255).sub(zero) * scale)
    positive = ActQuant().train()
    positive(torch.tensor([0.5, 2.0]))
    assert act_qparams(positive.min_val, positive.max_val)[1].item() == 0  # 0 is representable
