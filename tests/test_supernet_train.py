"""Supernet training: BN recalibration, sandwich steps, QAT phase, checkpoints, seeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_spaces import TINY, tiny_space
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autocomp import api, data
from autocomp.errors import AutocompError
from autocomp.quant.fake import ActQuant
from autocomp.supernet import train
from autocomp.supernet.bn import recalibrate_bn
from autocomp.supernet.ops import DynamicConv2d
from autocomp.supernet.train import (
    TrainConfig,
    calibration_batches,
    evaluate,
    evaluate_subnet,
    train_supernet,
    view,
)

FAST = {
    "epochs": 2,
    "batch_size": 16,
    "qat_epochs": 0,
    "optimizer": "adamw",
    "lr": 0.01,
    "sandwich_random": 1,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    return tiny_space("mbv3", tmp_path_factory.mktemp("spaces"), num_classes=10, in_channels=1)


def few_digits(train: int, test: int = 64):
    """Digits at their native 8×8, few of them: a handful of steps per epoch."""
    full = data.load("digits")
    return dataclasses.replace(
        full,
        x_train=full.x_train[:train],
        y_train=full.y_train[:train],
        x_test=full.x_test[:test],
        y_test=full.y_test[:test],
    )


@pytest.fixture(scope="module")
def digits():
    return few_digits(64)


def fresh(space, seed=1):
    torch.manual_seed(seed)
    return space.supernet()


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- BatchNorm recalibration -------------------------------------------------------------------


def test_recalibrate_bn_is_the_exact_average_over_batches():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3)
    model = nn.Sequential(conv, bn, nn.ReLU()).eval()
    batches = [torch.randn(8, 3, 6, 6) * (i + 1) + i for i in range(3)]
    with torch.no_grad():
        outs = [conv(b) for b in batches[:2]]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).flatten(1).var(1) for o in outs]).mean(0)

    recalibrate_bn(model, [(b, torch.zeros(8)) for b in batches], max_batches=2)

    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert int(bn.num_batches_tracked) == 2
    assert bn.momentum == 0.3 and not model.training


def test_recalibrate_bn_on_a_supernet_touches_the_active_slice_like_a_standalone_model(space):
    supernet = fresh(space).eval()
    candidate = space.smallest()
    batches = [torch.randn(16, 1, candidate.resolution, candidate.resolution) for _ in range(3)]
    standalone = space.build(candidate, supernet=supernet.set_active(candidate)).eval()
    stem_bn = supernet.net.stem.bn
    before = stem_bn.running_mean.clone()

    recalibrate_bn(supernet, batches)
    recalibrate_bn(standalone, batches)

    assert not torch.equal(stem_bn.running_mean, before)
    x = torch.randn(4, 1, candidate.resolution, candidate.resolution)
    with torch.no_grad():
        torch.testing.assert_close(supernet(x), standalone(x), rtol=1e-4, atol=1e-5)


def test_recalibrate_bn_refuses_no_batches():
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_bn(nn.BatchNorm2d(2), [])


# -- training ----------------------------------------------------------------------------------


def largest_loss(supernet, space, digits):
    """Cross-entropy of the largest subnet on the training images, after BN recalibration."""
    largest = space.largest()
    test = (digits.x_test, digits.y_test)
    evaluate_subnet(supernet, largest, calibration_batches(digits.x_train), test)
    with torch.no_grad():
        logits = supernet.eval()(view(torch.from_numpy(digits.x_train), largest.resolution))
    return float(F.cross_entropy(logits, torch.from_numpy(digits.y_train)))


def test_one_epoch_reduces_the_loss(space):
    digits = few_digits(128)
    supernet = fresh(space)
    before = largest_loss(supernet, space, digits)
    report = train_supernet(
        supernet,
        space,
        digits,
        TrainConfig(**{**FAST, "epochs": 1, "batch_size": 8}),
        progress=False,
    )
    after = largest_loss(supernet, space, digits)
    assert after < before - 0.1, (before, after)
    assert len(report.losses) == 1 and report.start_epoch == 0 and report.wall_s > 0


def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not(space, digits):
    runs = []
    for seed, init in ((0, 1), (0, 2), (1, 1)):
        supernet = fresh(space, seed=init)  # the seed of the run decides, not the caller's state
        supernet.load_state_dict(fresh(space, seed=7).state_dict())
        train_supernet(supernet, space, digits, TrainConfig(**FAST, seed=seed), progress=False)
        runs.append(supernet)
    assert weights_equal(runs[0], runs[1])
    assert not weights_equal(runs[0], runs[2])


def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(
    space, digits, tmp_path, monkeypatch
):
    config = TrainConfig(**{**FAST, "epochs": 3, "qat_epochs": 1})
    reference = fresh(space)
    train_supernet(reference, space, digits, config, progress=False)

    path = tmp_path / "supernet.pt"
    step, calls = train._sandwich_step, []

    def killed_in_the_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) > 64 // 16 + 2:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(train, "_sandwich_step", killed_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_supernet(fresh(space), space, digits, config, checkpoint=path, progress=False)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1

    resumed = fresh(space, seed=5)
    report = train_supernet(resumed, space, digits, config, checkpoint=path, progress=False)
    assert report.start_epoch == 1 and len(report.losses) == 3
    assert weights_equal(reference, resumed)

    again = fresh(space, seed=6)  # a finished checkpoint only loads
    assert train_supernet(again, space, digits, config, checkpoint=path).start_epoch == 3
    assert weights_equal(reference, again)


def test_a_checkpoint_of_another_config_is_refused(space, digits, tmp_path):
    path = tmp_path / "supernet.pt"
    config = TrainConfig(**{**FAST, "epochs": 1})
    train_supernet(fresh(space), space, digits, config, checkpoint=path, progress=False)
    other = dataclasses.replace(config, lr=0.02)
    with pytest.raises(AutocompError, match=r"another config \(lr: 0\.01 there, 0\.02 here\)"):
        train_supernet(fresh(space), space, digits, other, checkpoint=path, progress=False)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(AutocompError, match="cannot read supernet checkpoint"):
        train_supernet(fresh(space), space, digits, config, checkpoint=path, progress=False)


def test_the_qat_phase_turns_fake_quantization_on(space, digits, monkeypatch):
    seen = []
    step = train._sandwich_step

    def observed(supernet):
        return any(bool(m.initialized) for m in supernet.modules() if isinstance(m, ActQuant))

    def spy(supernet, *args, **kwargs):
        seen.append((supernet.quantize, observed(supernet)))
        return step(supernet, *args, **kwargs)

    monkeypatch.setattr(train, "_sandwich_step", spy)
    supernet = fresh(space)
    train_supernet(supernet, space, digits, TrainConfig(**{**FAST, "qat_epochs": 1}))
    steps = len(digits.y_train) // FAST["batch_size"]
    assert [q for q, _ in seen] == [False] * steps + [True] * steps
    assert not any(o for _, o in seen[: steps + 1])  # no activation range before the QAT phase
    assert observed(supernet)  # the int8 layers of the students were fake-quantized


def test_progressive_shrinking_releases_the_space_phase_by_phase(space):
    config = TrainConfig(
        epochs=8, qat_epochs=2, progressive=True, phases=(("arch.kernel",), ("arch.depth",))
    )
    sampler = train._Sampler(space, config, np.random.default_rng(0))
    assert [sampler.phase(e) for e in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert sampler.students(0) == []
    largest = space.largest()
    for student in sampler.students(1):
        assert student.resolution == largest.resolution
        assert {k: v for k, v in student.arch.items() if not k.startswith("kernel")} == {
            k: v for k, v in largest.arch.items() if not k.startswith("kernel")
        }
    assert sampler.students(1)[0].arch["kernel.1.0"] == 3  # the phase's smallest
    assert sampler.students(2)[0] == space.smallest()


def test_progressive_training_runs_and_reorders_channels(space, digits, monkeypatch):
    reorders = []
    monkeypatch.setattr(type(fresh(space)), "reorder_channels", lambda self: reorders.append(1))
    config = TrainConfig(**{**FAST, "epochs": 3, "progressive": True, "phases": (("arch",),)})
    report = train_supernet(fresh(space), space, digits, config, progress=False)
    assert len(report.losses) == 3 and len(reorders) == 1


@pytest.mark.parametrize("kind", list(TINY))
def test_zero_init_residuals_makes_every_depth_the_same_function(kind, tmp_path):
    space = tiny_space(kind, tmp_path, num_classes=10, in_channels=1)
    deep = space.largest()
    values = space.values(deep)
    depths = {k: v for k, v in values.items() if k.startswith("arch.depth.")}
    shallow = space.from_values({**values, **{k: 1 for k in depths}})
    assert max(depths.values()) > 1
    supernet = fresh(space).train()  # batch statistics: a fresh net's outputs vary with x
    x = torch.randn(4, 1, deep.resolution, deep.resolution)
    with torch.no_grad():
        before = supernet.set_active(deep)(x), supernet.set_active(shallow)(x)
        assert not torch.allclose(*before)
        zeroed = supernet.zero_init_residuals()
        after = supernet.set_active(deep)(x), supernet.set_active(shallow)(x)
    assert zeroed == sum(d - 1 for d in depths.values()) + (kind != "mbv3") * len(depths)
    torch.testing.assert_close(*after, rtol=0, atol=0)


@pytest.mark.parametrize("enabled", [True, False])
def test_a_fresh_run_zero_inits_the_residual_branches_and_a_resumed_one_does_not(
    space, digits, tmp_path, monkeypatch, enabled
):
    calls = []
    supernet = fresh(space)
    original = type(supernet).zero_init_residuals
    monkeypatch.setattr(
        type(supernet), "zero_init_residuals", lambda self: calls.append(1) or original(self)
    )
    config = TrainConfig(**{**FAST, "epochs": 1}, zero_init_residual=enabled)
    path = tmp_path / "supernet.pt"
    train_supernet(supernet, space, digits, config, checkpoint=path, progress=False)
    assert len(calls) == int(enabled)
    train_supernet(fresh(space), space, digits, config, checkpoint=path, progress=False)
    assert len(calls) == int(enabled)  # the finished checkpoint loaded: no new initialisation


def test_the_search_trains_its_supernet_with_the_trainer_defaults():
    """One source of truth: a default search's supernet config is ``TrainConfig()``'s."""
    config = api.supernet_config(api.Effort.of(quick=False), seed=3)
    assert config == TrainConfig(seed=3, num_threads=1)
    quick = api.supernet_config(api.Effort.of(quick=True), seed=0)
    assert quick.epochs < config.epochs and quick.qat_epochs <= config.qat_epochs


@pytest.mark.parametrize(
    ("side", "stride", "cropped"), [(1, 1, 1), (2, 1, 3), (2, 2, 3), (3, 1, 5), (5, 2, 7)]
)
def test_training_convs_skip_kernel_taps_that_only_meet_padding(side, stride, cropped, monkeypatch):
    torch.manual_seed(0)
    conv = DynamicConv2d(6, 6, 7, stride, depthwise=True)
    x = torch.randn(3, 6, side, side, requires_grad=True)
    full = F.conv2d(x, conv.weight, None, stride, 3, 1, 6)
    seen, conv2d = [], F.conv2d

    def spy(x, weight, *args):
        seen.append(weight.shape[-1])
        return conv2d(x, weight, *args)

    monkeypatch.setattr(F, "conv2d", spy)
    out = conv.train()(x)
    assert seen == [cropped]
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (x, conv.weight))
    expected = torch.autograd.grad(full.square().sum(), (x, conv.weight))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    seen.clear()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        conv.eval()(x)
    assert seen == [7]  # eval mode (export, FLOP counting) keeps the whole kernel
    assert counter.get_total_flops() == 2 * 3 * 6 * 49 * full.shape[-1] ** 2


# -- evaluation --------------------------------------------------------------------------------


def test_evaluate_subnet_scores_what_build_extracts(space, digits):
    supernet = fresh(space)
    train_supernet(supernet, space, digits, TrainConfig(**FAST), progress=False)
    test = (digits.x_test, digits.y_test)
    candidate = space.sample(np.random.default_rng(3))
    assert 8 in candidate.bits.values()
    accuracy = evaluate_subnet(supernet, candidate, calibration_batches(digits.x_train), test)
    standalone = space.build(candidate, supernet=supernet).eval()
    assert accuracy == evaluate(standalone, test, candidate.resolution)
    x = view(torch.from_numpy(digits.x_test), candidate.resolution)
    with torch.no_grad():
        expected = standalone(x)
        torch.testing.assert_close(expected, supernet.eval()(x), rtol=1e-4, atol=1e-4)
    # Per image, the outputs behind the score are the extracted network's.
    logits = train.subnet_logits(supernet, candidate, calibration_batches(digits.x_train), test[0])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert float((logits.argmax(1) == torch.from_numpy(test[1])).double().mean()) == accuracy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"epochs": 2, "qat_epochs": 3}, "qat_epochs must lie between 0 and epochs"),
        ({"optimizer": "adam"}, "unknown optimizer 'adam'"),
        ({"teacher_resolution": "min"}, "teacher_resolution must be one of"),
    ],
)
def test_bad_configs_are_refused(change, message):
    with pytest.raises(AutocompError, match=message):
        TrainConfig(**change)
