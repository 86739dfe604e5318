"""Finetuning of the chosen model: distillation from a teacher, then quantization-aware training.

The model a search picks (a subnet extracted from the supernet, or a pruned network) is trained
further on the training split: Hinton knowledge distillation from a teacher (the supernet's
largest subnet, or the original model) blended with the labels, optionally FitNets feature hints,
then a few epochs with its int8 layers fake-quantized (their observers calibrated first), so the
weights settle on the grid the exported model computes with. Each phase keeps the weights that
scored best on the validation split — the starting weights included, so finetuning never hands
back a model worse on validation than the one it got — and the fp32 phase stops early when the
validation accuracy stops improving. The test split is never seen: the caller passes a
validation split carved from the training data (``ImageDataset.validation_split``).

The loss, optimizer, schedule, augmentation and evaluation are the supernet trainer's
(:mod:`autocomp.supernet.train`), so a subnet is finetuned with the recipe it was trained with.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from autocomp.errors import AutocompError
from autocomp.quant.fake import ActQuant, QuantLayer, set_quantization
from autocomp.supernet.train import (
    OPTIMIZERS,
    distill_loss,
    evaluate,
    make_optimizer,
    random_shifts,
    seed_everything,
    view,
    warmup_cosine,
)

Split = tuple[np.ndarray | Tensor, np.ndarray | Tensor]  # (images N×C×H×W, labels N)

#: Training batches whose activations set the int8 layers' ranges before quantization-aware
#: training starts.
CALIBRATION_BATCHES = 16


@dataclass
class FinetuneConfig:
    """Finetuning hyper-parameters; the defaults suit a subnet inherited from a trained supernet."""

    epochs: int = 20  # at most, the QAT epochs included
    qat_epochs: int = 3  # final epochs with the int8 layers fake-quantized (skipped if none)
    batch_size: int = 64
    lr: float = 0.01
    qat_lr: float | None = None  # None: lr / 10
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum 0.9) or "adamw"
    weight_decay: float = 5e-5
    warmup_epochs: float = 1.0
    kd_temperature: float = 2.0
    kd_weight: float = 0.5  # share of the distillation term; the rest is label cross-entropy
    label_smoothing: float = 0.1
    augment: float = 0.1  # max random shift, as a fraction of the image side (0: none)
    hints: tuple[tuple[str, str], ...] = ()  # (student module, teacher module) feature pairs
    hint_weight: float = 1.0  # weight of the summed hint losses (only with ``hints``)
    patience: int | None = 5  # fp32 epochs without a better validation accuracy before stopping
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads for the run (None: leave as is)

    def __post_init__(self) -> None:
        self.hints = tuple((str(s), str(t)) for s, t in self.hints)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise AutocompError(f"finetune config: {name} must be at least 1")
        if not 0 <= self.qat_epochs <= self.epochs:
            raise AutocompError("finetune config: qat_epochs must lie between 0 and epochs")
        if self.optimizer not in OPTIMIZERS:
            raise AutocompError(
                f"finetune config: unknown optimizer {self.optimizer!r}; use one of {OPTIMIZERS}"
            )
        if self.lr <= 0 or (self.qat_lr is not None and self.qat_lr <= 0):
            raise AutocompError("finetune config: learning rates must be positive")
        if not 0 <= self.kd_weight <= 1:
            raise AutocompError("finetune config: kd_weight must lie between 0 and 1")
        if self.kd_temperature <= 0 or self.weight_decay < 0 or self.hint_weight < 0:
            raise AutocompError(
                "finetune config: kd_temperature must be positive, weight_decay and "
                "hint_weight non-negative"
            )
        if self.patience is not None and self.patience < 1:
            raise AutocompError("finetune config: patience must be at least 1 (or None)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return {k: [list(p) for p in v] if k == "hints" else v for k, v in asdict(self).items()}


@dataclass
class EpochRecord:
    epoch: int  # 1-based, counted across both phases
    phase: str  # "fp32" or "qat"
    loss: float  # mean training loss
    val_accuracy: float


@dataclass
class FinetuneReport:
    """What finetuning did. ``best_epoch`` is the epoch whose weights were returned (0: none beat
    the weights it was given); ``val_accuracy`` is the returned model's, int8 layers fake-quantized
    when QAT ran."""

    start_accuracy: float  # validation accuracy of the model as given (fp32)
    val_accuracy: float
    best_epoch: int
    stopped_early: bool
    history: list[EpochRecord] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finetune(
    model: nn.Module,
    teacher: nn.Module | None,
    train_data: Split,
    val_data: Split,
    config: FinetuneConfig | None = None,
    *,
    resolution: int | None = None,
    teacher_resolution: int | None = None,
    progress: bool = True,
) -> FinetuneReport:
    """Train ``model`` in place on ``train_data``; select and stop on ``val_data``.

    ``teacher`` is any module producing logits (``None``: labels only); it runs in eval mode on
    the same augmented images as the student, resized to ``teacher_resolution`` (default: the
    student's). ``resolution`` is the student's input side (default: the images' own). On return
    ``model`` holds the best weights, in eval mode, with its int8 layers fake-quantized if QAT ran.
    """
    config = config or FinetuneConfig()
    if len(train_data[1]) == 0 or len(val_data[1]) == 0:
        raise AutocompError("finetuning needs non-empty training and validation splits")
    if config.hints and teacher is None:
        raise AutocompError("feature hints need a teacher")
    threads = torch.get_num_threads()
    teacher_mode = teacher.training if teacher is not None else False
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _finetune(
            model, teacher, train_data, val_data, config, resolution, teacher_resolution, progress
        )
    finally:
        torch.set_num_threads(threads)
        if teacher is not None:
            teacher.train(teacher_mode)


def calibrate_quantizers(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Reset the activation observers of ``model`` and set their ranges from ``batches``.

    Only the observers update (everything else stays in eval mode: BatchNorm statistics are
    kept), and only those of layers whose fake quantization is on. ``batches`` are inputs shaped
    for ``model`` from the training split.
    """
    was_training = model.training
    model.eval()
    observers = [m for m in model.modules() if isinstance(m, ActQuant)]
    for q in observers:
        q.initialized.fill_(False)
        q.train()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        model.train(was_training)
    return model


# ------------------------------------------------------------------------------------ training


def _finetune(
    model: nn.Module,
    teacher: nn.Module | None,
    train_data: Split,
    val_data: Split,
    config: FinetuneConfig,
    resolution: int | None,
    teacher_resolution: int | None,
    progress: bool,
) -> FinetuneReport:
    seed_everything(config.seed)
    x, y = (torch.as_tensor(a) for a in train_data)
    side = resolution or int(x.shape[-1])
    teacher_side = teacher_resolution or side
    batch = min(config.batch_size, len(y))
    steps = len(y) // batch
    model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.eval()
    hints = (
        _Hints(model, teacher, config.hints, view(x[:batch], side), view(x[:batch], teacher_side))
        if teacher is not None and config.hints
        else None
    )
    int8 = any(isinstance(m, QuantLayer) and m.bits < 32 for m in model.modules())
    qat_epochs = config.qat_epochs if int8 else 0  # an fp32 model trains every epoch in fp32
    phases = [("fp32", config.epochs - qat_epochs, config.lr)]
    if qat_epochs:
        phases.append(("qat", qat_epochs, config.qat_lr or config.lr / 10))
    start = time.perf_counter()
    set_quantization(model, False)
    report = FinetuneReport(
        start_accuracy=evaluate(model, val_data, side),
        val_accuracy=0.0,
        best_epoch=0,
        stopped_early=False,
    )
    bar = tqdm(total=steps * sum(p[1] for p in phases), desc="finetune", disable=not progress)

    def train_epoch(optimizer, scheduler) -> float:
        model.train()
        total = 0.0
        order = torch.randperm(len(y))[: steps * batch].view(steps, batch)
        for step, index in enumerate(order, 1):
            xb, yb = x[index], y[index]
            theta = random_shifts(len(xb), config.augment) if config.augment > 0 else None
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(view(xb, teacher_side, theta))
            logits = model(view(xb, side, theta))
            loss = distill_loss(
                logits,
                yb,
                teacher_logits,
                temperature=config.kd_temperature,
                kd_weight=config.kd_weight,
                label_smoothing=config.label_smoothing,
            )
            if hints is not None:
                loss = loss + config.hint_weight * hints.loss()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            total += loss.item()
            bar.update()
            bar.set_postfix(loss=f"{total / step:.3f}", best=f"{best:.2%}")
        return total / steps

    try:
        epoch = 0
        for phase, epochs, lr in phases:
            if phase == "qat":
                set_quantization(model, True)
                calibrate_quantizers(
                    model, (view(b, side) for b in x[: CALIBRATION_BATCHES * batch].split(batch))
                )
            best = report.start_accuracy if phase == "fp32" else evaluate(model, val_data, side)
            best_state = copy.deepcopy(model.state_dict())
            trained = nn.ModuleList([model, *([hints.regressors] if hints else [])])
            optimizer = make_optimizer(trained, config.optimizer, lr, config.weight_decay)
            warmup = round(config.warmup_epochs * steps) if phase == "fp32" else 0
            scheduler = warmup_cosine(optimizer, steps * epochs, warmup)
            waited = 0
            for left in range(epochs - 1, -1, -1):
                epoch += 1
                loss = train_epoch(optimizer, scheduler)
                accuracy = evaluate(model, val_data, side)
                report.history.append(EpochRecord(epoch, phase, loss, accuracy))
                waited += 1
                if accuracy > best:
                    best, best_state, waited = accuracy, copy.deepcopy(model.state_dict()), 0
                    report.best_epoch = epoch
                elif phase == "fp32" and config.patience and waited >= config.patience and left:
                    report.stopped_early = True
                    bar.update(steps * left)
                    break
            model.load_state_dict(best_state)
            report.val_accuracy = best
    finally:
        bar.close()
        if hints is not None:
            hints.remove()
    model.eval()
    report.wall_s = time.perf_counter() - start
    return report


class _Hints:
    """FitNets hints: a 1×1 regressor maps each student feature onto its teacher feature (MSE).

    Features are caught by forward hooks; differing spatial sizes are average-pooled to the
    smaller one. The regressors are trained with the student and dropped afterwards.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: Sequence[tuple[str, str]],
        probe_student: Tensor,
        probe_teacher: Tensor,
    ) -> None:
        self.features: dict[tuple[int, int], Tensor] = {}
        self.handles = []
        for side, net in ((0, student), (1, teacher)):
            for i, pair in enumerate(pairs):
                try:
                    module = net.get_submodule(pair[side])
                except AttributeError:
                    who = ("student", "teacher")[side]
                    raise AutocompError(f"hint: the {who} has no module {pair[side]!r}") from None
                self.handles.append(module.register_forward_hook(self._keep((side, i))))
        was_training = student.training
        student.eval()
        with torch.no_grad():
            student(probe_student)
            teacher(probe_teacher)
        student.train(was_training)
        self.regressors = nn.ModuleList(
            self._regressor(self.features[0, i], self.features[1, i]) for i in range(len(pairs))
        ).to(memory_format=torch.channels_last)

    def _keep(self, key: tuple[int, int]):
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            self.features[key] = output

        return hook

    @staticmethod
    def _regressor(student: Tensor, teacher: Tensor) -> nn.Module:
        if student.dim() != teacher.dim() or student.dim() not in (2, 4):
            raise AutocompError(
                f"hint: cannot match a feature of shape {tuple(student.shape[1:])} to one of "
                f"{tuple(teacher.shape[1:])}"
            )
        if student.dim() == 2:
            return nn.Linear(student.shape[1], teacher.shape[1], bias=False)
        return nn.Conv2d(student.shape[1], teacher.shape[1], 1, bias=False)

    def loss(self) -> Tensor:
        total = torch.zeros(())
        for i, regressor in enumerate(self.regressors):
            s, t = regressor(self.features[0, i]), self.features[1, i].detach()
            if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
                hw = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
                s, t = F.adaptive_avg_pool2d(s, hw), F.adaptive_avg_pool2d(t, hw)
            total = total + F.mse_loss(s, t)
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
