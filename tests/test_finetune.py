"""Finetuning: distillation improves a fresh subnet, best weights come back, seeds reproduce."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import trained_tiny as tt

from autocomp.errors import AutocompError
from autocomp.finetune import FinetuneConfig, calibrate_quantizers, finetune
from autocomp.quant.fake import ActQuant, set_quantization
from autocomp.supernet.train import evaluate, view

pytestmark = pytest.mark.usefixtures("one_thread")


def small(split, n):
    return split[0][:n], split[1][:n]


def states_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.mark.slow
def test_distillation_improves_a_fresh_subnet_and_ends_quantized():
    train, val, _ = tt.splits()
    teacher = tt.teacher()
    assert evaluate(teacher, val, tt.TEACHER_RESOLUTION) > 0.85
    model = tt.build(tt.student_candidate(), seed=3)
    config = FinetuneConfig(epochs=4, qat_epochs=1, kd_weight=0.7, **tt.QUICK)
    # The student runs at 12 px, the teacher at its own 16 px: each sees its own resize.
    report = finetune(
        model, teacher, train, val, config, resolution=12,
        teacher_resolution=tt.TEACHER_RESOLUTION, progress=False,
    )  # fmt: skip
    assert report.start_accuracy < 0.2
    assert report.val_accuracy > 0.8
    assert [r.phase for r in report.history] == ["fp32"] * 3 + ["qat"]
    assert [r.epoch for r in report.history] == [1, 2, 3, 4]
    # The returned model is the best one, as deployed: int8 layers fake-quantized, eval mode.
    assert not model.training and not teacher.training
    assert evaluate(model, val, 12) == report.val_accuracy
    assert report.val_accuracy >= max(r.val_accuracy for r in report.history if r.phase == "qat")
    best = report.history[report.best_epoch - 1] if report.best_epoch else None
    if best is not None and best.phase == "qat":  # an fp32 epoch's record scores it unquantized
        assert best.val_accuracy == report.val_accuracy
    int8 = [model.get_submodule(n) for n, b in tt.student_candidate().bits.items() if b == 8]
    assert int8 and all(layer.quantized and bool(layer.in_q.initialized) for layer in int8)
    assert report.wall_s > 0


def test_early_stopping_restores_the_best_epoch():
    """Validation labels are noise: the accuracy wanders, stops improving, best weights return."""
    train, val, _ = tt.splits()
    noise = np.random.default_rng(0).permutation(val[1])
    model = tt.build(tt.student_candidate(), seed=5)
    config = FinetuneConfig(epochs=12, qat_epochs=0, patience=2, **tt.QUICK)
    report = finetune(
        model, None, small(train, 256), (val[0], noise), config, resolution=12, progress=False
    )
    assert report.stopped_early
    assert len(report.history) < 12
    best = max([report.start_accuracy] + [r.val_accuracy for r in report.history])
    assert report.val_accuracy == best == evaluate(model, (val[0], noise), 12)
    after_best = report.history[report.best_epoch :]
    assert len(after_best) == 2 and all(r.val_accuracy <= best for r in after_best)


def test_a_model_without_int8_layers_trains_every_epoch_in_fp32():
    """QAT epochs asked for but nothing to quantize: they are fp32 epochs, not lost ones."""
    train, val, _ = tt.splits()
    candidate = tt.student_candidate()
    fp32 = dataclasses.replace(candidate, bits={name: 32 for name in candidate.bits})
    model = tt.build(fp32, seed=5)
    config = FinetuneConfig(epochs=3, qat_epochs=2, patience=None, **tt.QUICK)
    report = finetune(model, None, small(train, 128), val, config, resolution=12, progress=False)
    assert [(r.epoch, r.phase) for r in report.history] == [(1, "fp32"), (2, "fp32"), (3, "fp32")]


@pytest.mark.slow
def test_same_seed_same_weights_other_seed_other_weights():
    train, val, _ = tt.splits()
    runs = []
    for seed in (0, 0, 1):
        model = tt.build(tt.student_candidate(), seed=7)
        config = FinetuneConfig(epochs=2, qat_epochs=1, **{**tt.QUICK, "seed": seed})
        report = finetune(
            model, tt.teacher(), train, small(val, 128), config, resolution=12,
            teacher_resolution=16, progress=False,
        )  # fmt: skip
        runs.append((report, model.state_dict()))
    (a, wa), (b, wb), (c, wc) = runs
    assert a.best_epoch > 0 and c.best_epoch > 0  # trained weights came back, not the initial
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    assert states_equal(wa, wb)
    assert [r.loss for r in a.history] != [r.loss for r in c.history]
    assert not states_equal(wa, wc)


def test_feature_hints_train_and_leave_no_hooks():
    train, val, _ = tt.splits()
    pair = ("stages.2", "stages.2")
    model = tt.build(tt.student_candidate(), seed=3)
    teacher = tt.teacher()
    config = FinetuneConfig(epochs=2, qat_epochs=0, hints=(pair,), **tt.QUICK)
    report = finetune(
        model, teacher, train, small(val, 128), config, resolution=12, teacher_resolution=16,
        progress=False,
    )  # fmt: skip
    assert report.val_accuracy > report.start_accuracy + 0.3
    assert config.to_dict()["hints"] == [["stages.2", "stages.2"]]
    for net in (model, teacher):
        assert not net.get_submodule("stages.2")._forward_hooks
    with pytest.raises(AutocompError, match=r"^hint: the teacher has no module 'nope'$"):
        finetune(
            model, teacher, train, val, FinetuneConfig(hints=(("stages.2", "nope"),)),
            progress=False,
        )  # fmt: skip
    with pytest.raises(AutocompError, match=r"^feature hints need a teacher$"):
        finetune(model, None, train, val, FinetuneConfig(hints=(pair,)), progress=False)


def test_calibrate_quantizers_sets_ranges_and_keeps_batchnorm():
    model = tt.build(tt.student_candidate(), seed=2)
    set_quantization(model.train(), True)
    bn = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = view(torch.from_numpy(tt.splits()[0][0][:64]), 16)
    calibrate_quantizers(model, [x])
    assert model.training
    after = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(bn, after, strict=True))
    int8 = {n for n, b in tt.student_candidate().bits.items() if b == 8}
    for name, q in model.named_modules():
        if isinstance(q, ActQuant):
            assert bool(q.initialized) == (name.rsplit(".", 1)[0] in int8), name
    first = model.get_submodule(sorted(int8)[0])
    assert first.in_q.min_val < first.in_q.max_val


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "finetune config: epochs must be at least 1"),
        (
            {"epochs": 2, "qat_epochs": 3},
            "finetune config: qat_epochs must lie between 0 and epochs",
        ),
        ({"optimizer": "lion"}, "finetune config: unknown optimizer 'lion'"),
        ({"kd_weight": 1.5}, "finetune config: kd_weight must lie between 0 and 1"),
        ({"patience": 0}, "finetune config: patience must be at least 1"),
        ({"qat_lr": -1.0}, "finetune config: learning rates must be positive"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(AutocompError, match="^" + message.replace("(", r"\(")):
        FinetuneConfig(**kwargs)


def test_empty_validation_split_is_refused():
    train, val, _ = tt.splits()
    model = tt.build(tt.student_candidate())
    with pytest.raises(AutocompError, match="needs non-empty training and validation splits"):
        finetune(model, None, train, (val[0][:0], val[1][:0]), progress=False)
