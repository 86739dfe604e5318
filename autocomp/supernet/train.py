"""Supernet training: sandwich rule, in-place distillation, progressive shrinking, QAT, resume.

One optimizer step trains several subnets that share weights (BigNAS): the largest on the labels,
the smallest and ``sandwich_random`` random ones on the largest's detached soft predictions
(in-place distillation), gradients accumulated over all of them. Each subnet sees the batch at its
own resolution. Optionally the space is released in phases, largest network first (OFA's
progressive shrinking), and the last ``qat_epochs`` run with fake quantization on, so that
candidates with int8 layers are scored by weights that learned to live with int8 (APQ).

The loss, schedule and seeding pieces are public because the finetuning of the chosen subnet
(:mod:`autocomp.finetune`) trains with the same recipe.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from autocomp.errors import AutocompError
from autocomp.quant.fake import ActQuant
from autocomp.supernet.bn import recalibrate_bn

if TYPE_CHECKING:
    from autocomp.data import ImageDataset
    from autocomp.spaces import Candidate, SearchSpace
    from autocomp.supernet.supernet import Supernet

OPTIMIZERS = ("sgd", "adamw")
TEACHER_RESOLUTIONS = ("max", "sample")
#: OFA's order of progressive shrinking: resolution and kernel, then depth, then the widths.
PHASES = (
    ("resolution", "arch.kernel"),
    ("arch.depth",),
    ("arch.expand", "arch.ratio", "arch.width", "widths"),
)


@dataclass
class TrainConfig:
    """Supernet training hyper-parameters; the defaults meet the ``digits`` targets on 2 cores."""

    epochs: int = 16  # in total, the QAT epochs included
    batch_size: int = 32
    # SGD, not AdamW: on digits after 4 epochs the largest/smallest scored 98 %/93 % vs 97 %/81 %,
    # on digits_hard 62 %/42 % vs 32 %/16 %. The subnets' gradients add up, so the rate is half
    # what trains the largest alone best (0.1; 0.25 diverged).
    lr: float = 0.05
    weight_decay: float = 5e-5
    optimizer: str = "sgd"  # Nesterov momentum 0.9; or "adamw"
    warmup_epochs: float = 0.3
    sandwich_random: int = 2  # random subnets per step, besides the largest and the smallest
    kd_temperature: float = 1.0
    kd_weight: float = 1.0  # share of the distillation term in the students' loss
    label_smoothing: float = 0.1
    augment: float = 0.1  # max random shift, as a fraction of the image side (0: none)
    # Training resolutions are drawn with probability ∝ side**-resolution_power (0: uniform; 2:
    # equal compute per resolution, cheap sides take most steps). Uniform: on digits_hard (sides
    # 32/48/64) power 2 left the 64² subnets undertrained (inherited 59-63 % vs 73-75 % after a
    # short finetune) and the supernet ranked 12 subnets at Kendall τ 0.32 against their
    # finetuned accuracy; uniform drawing reached τ 0.93 for 23 % more CPU time
    # (experiments/ranking_fidelity.py).
    resolution_power: float = 0.0
    teacher_resolution: str = "sample"  # the largest's: "max" every step, or drawn as above
    progressive: bool = False  # OFA progressive shrinking instead of the full space throughout
    phases: tuple[tuple[str, ...], ...] = PHASES  # params released per phase, by name prefix
    qat_epochs: int = 2  # final epochs with fake quantization of the int8 layers
    zero_init_residual: bool = True  # a fresh run starts every residual branch at zero
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads for the run (None: leave as is)

    def __post_init__(self) -> None:
        self.phases = tuple(tuple(p) for p in self.phases)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise AutocompError(f"train config: {name} must be at least 1")
        if not 0 <= self.qat_epochs <= self.epochs:
            raise AutocompError("train config: qat_epochs must lie between 0 and epochs")
        if self.optimizer not in OPTIMIZERS:
            raise AutocompError(
                f"train config: unknown optimizer {self.optimizer!r}; use one of {OPTIMIZERS}"
            )
        if self.lr <= 0 or self.weight_decay < 0 or self.sandwich_random < 0:
            raise AutocompError(
                "train config: lr must be positive, weight_decay and sandwich_random non-negative"
            )
        if self.teacher_resolution not in TEACHER_RESOLUTIONS:
            raise AutocompError(
                f"train config: teacher_resolution must be one of {TEACHER_RESOLUTIONS}, "
                f"got {self.teacher_resolution!r}"
            )
        if not 0 <= self.kd_weight <= 1:
            raise AutocompError("train config: kd_weight must lie between 0 and 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return json.loads(json.dumps(asdict(self)))


@dataclass
class TrainReport:
    """What a training run did: per-epoch mean losses and wall time of this process's epochs."""

    epochs: int
    start_epoch: int  # 0 for a fresh run; the first epoch trained here after resuming
    losses: list[float] = field(default_factory=list)  # mean largest-subnet loss, every epoch
    wall_s: float = 0.0


# ---------------------------------------------------------------------------------- shared pieces


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python's, NumPy's and torch's global RNGs; return a Generator for candidate sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def distill_loss(
    logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``kd_weight`` · Hinton KD (KL to the teacher's softened output, times T²) + the rest · CE.

    Without a teacher it is the (label-smoothed) cross-entropy alone.
    """
    ce = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    if teacher_logits is None or kd_weight == 0:
        return ce
    t = temperature
    kd = F.kl_div(
        F.log_softmax(logits / t, dim=1),
        F.softmax(teacher_logits.detach() / t, dim=1),
        reduction="batchmean",
    ) * (t * t)
    return kd_weight * kd + (1 - kd_weight) * ce if kd_weight < 1 else kd


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float):
    """SGD-Nesterov or AdamW; no weight decay on BatchNorm parameters and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def warmup_cosine(
    optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base rate, then cosine decay to zero at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def view(x: Tensor, resolution: int, theta: Tensor | None = None) -> Tensor:
    """``x`` resampled to ``resolution``² (bilinear), optionally through per-image affines.

    With one ``theta`` per image shared by every subnet of a step, teacher and students see the
    same augmented image, each at its own resolution. The result is channels-last, the layout in
    which torch's CPU convolutions (depthwise ones above all) run fastest.
    """
    if theta is not None:
        grid = F.affine_grid(theta, [len(x), x.shape[1], resolution, resolution], False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    elif x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(
            x,
            size=(resolution, resolution),
            mode="bilinear",
            align_corners=False,
            antialias=resolution < max(x.shape[-2:]),
        )
    return x.contiguous(memory_format=torch.channels_last)


def random_shifts(n: int, max_shift: float) -> Tensor:
    """Per-image affines translating by up to ``max_shift`` of the side (grid units are 2/side)."""
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = (torch.rand(n, 2) * 2 - 1) * (2 * max_shift)
    return theta


# --------------------------------------------------------------------------------- the training


def _released(name: str, group: Sequence[str]) -> bool:
    return any(name == g or name.startswith(g + ".") for g in group)


class _Sampler:
    """The subnets of one step: the largest, and students drawn from the part of the space released.

    Without progressive shrinking the whole space is released from the first epoch. With it, the
    fp32 epochs are split into ``len(groups) + 1`` equal phases: phase 0 trains the largest alone,
    phase k releases the first k groups of params (by name prefix, others held at their largest),
    and the last phase — and the QAT epochs — release everything.
    """

    def __init__(self, space: SearchSpace, config: TrainConfig, rng: np.random.Generator) -> None:
        self.space, self.config, self.rng = space, config, rng
        self.largest = space.largest()
        self.resolutions = next(p.choices for p in space.params if p.name == "resolution")
        weights = np.asarray(self.resolutions, dtype=float) ** -config.resolution_power
        self.resolution_p = weights / weights.sum()
        names = [p.name for p in space.params]
        groups = [g for g in config.phases if any(_released(n, g) for n in names)]
        self.groups = groups if config.progressive else []

    def phase(self, epoch: int) -> int:
        fp32_epochs = self.config.epochs - self.config.qat_epochs
        if not self.groups or epoch >= fp32_epochs:
            return len(self.groups)
        return min(len(self.groups), epoch * (len(self.groups) + 1) // fp32_epochs)

    def resized(self, candidate: Candidate) -> Candidate:
        side = self.resolutions[self.rng.choice(len(self.resolutions), p=self.resolution_p)]
        return replace(candidate, resolution=side)

    def teacher(self) -> Candidate:
        """The largest architecture, at the highest or at a drawn resolution."""
        if self.config.teacher_resolution == "max":
            return self.largest
        return self.resized(self.largest)

    def students(self, phase: int) -> list[Candidate]:
        """The smallest (at its own resolution) and random ones (at drawn resolutions)."""
        n = self.config.sandwich_random
        if phase == len(self.groups):
            randoms = [self.resized(self.space.sample(self.rng)) for _ in range(n)]
            return [self.space.smallest(), *randoms]
        if phase == 0:
            return []
        groups = self.groups[:phase]

        def restricted(pick: Callable[[tuple[Any, ...]], Any]) -> Candidate:
            values = {
                p.name: pick(p.choices)
                if any(_released(p.name, g) for g in groups)
                else max(p.choices)
                for p in self.space.params
            }
            return self.space.from_values(values)

        randoms = [restricted(lambda c: c[self.rng.integers(len(c))]) for _ in range(n)]
        if any(_released("resolution", g) for g in groups):
            randoms = [self.resized(c) for c in randoms]
        return [restricted(min), *randoms]


def train_supernet(
    supernet: Supernet,
    space: SearchSpace,
    dataset: ImageDataset,
    config: TrainConfig | None = None,
    *,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> TrainReport:
    """Train ``supernet`` on ``dataset.x_train`` with the sandwich rule; resumable per epoch.

    With ``checkpoint``, the state is saved there after every epoch, and an existing checkpoint
    (written with the same space and config) is resumed from the epoch after the one it holds:
    the final weights equal an uninterrupted run's. A finished checkpoint just loads its weights.
    """
    config = config or TrainConfig()
    threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(supernet, space, dataset, config, checkpoint, progress)
    finally:
        torch.set_num_threads(threads)
        supernet.set_active(space.largest())


def _train(
    supernet: Supernet,
    space: SearchSpace,
    dataset: ImageDataset,
    config: TrainConfig,
    checkpoint: Path | None,
    progress: bool,
) -> TrainReport:
    rng = seed_everything(config.seed)
    supernet.to(memory_format=torch.channels_last)  # before the optimizer takes the parameters
    x, y = torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train)
    batch = min(config.batch_size, len(y))
    steps = len(y) // batch
    optimizer = make_optimizer(supernet, config.optimizer, config.lr, config.weight_decay)
    scheduler = warmup_cosine(optimizer, steps * config.epochs, round(config.warmup_epochs * steps))
    sampler = _Sampler(space, config, rng)
    report = TrainReport(epochs=config.epochs, start_epoch=0)
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint, space=space, config=config)
        _restore(state, supernet, optimizer, scheduler, rng, checkpoint)
        report.start_epoch, report.losses = state["epoch"], list(state["losses"])
    elif config.zero_init_residual:
        supernet.zero_init_residuals()
    start = time.perf_counter()
    bar = tqdm(
        total=steps * (config.epochs - report.start_epoch),
        desc="supernet",
        unit="step",
        disable=not progress,
    )
    for epoch in range(report.start_epoch, config.epochs):
        phase = sampler.phase(epoch)
        if epoch > 0 and phase != sampler.phase(epoch - 1):
            supernet.reorder_channels()  # the released widths keep the most important channels
            optimizer.state.clear()  # momenta were indexed by the old channel order
        supernet.set_quantization(epoch >= config.epochs - config.qat_epochs)
        supernet.train()
        total = 0.0
        order = torch.randperm(len(y))[: steps * batch].view(steps, batch)
        for step, index in enumerate(order, 1):
            total += _sandwich_step(supernet, sampler, phase, x[index], y[index], config)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            bar.update()
            bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{total / step:.3f}")
        report.losses.append(total / steps)
        if checkpoint is not None:
            _save(Path(checkpoint), supernet, space, config, optimizer, scheduler, rng, report)
    bar.close()
    report.wall_s = time.perf_counter() - start
    return report


def _sandwich_step(
    supernet: Supernet,
    sampler: _Sampler,
    phase: int,
    x: Tensor,
    y: Tensor,
    config: TrainConfig,
) -> float:
    """Accumulate the gradients of the largest (labels) and the students (its soft labels)."""
    theta = random_shifts(len(x), config.augment) if config.augment > 0 else None
    largest = sampler.teacher()
    supernet.set_active(largest)
    logits = supernet(view(x, largest.resolution, theta))
    loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
    loss.backward()
    teacher = logits.detach()
    for candidate in sampler.students(phase):
        supernet.set_active(candidate)
        out = supernet(view(x, candidate.resolution, theta))
        distill_loss(
            out,
            y,
            teacher,
            temperature=config.kd_temperature,
            kd_weight=config.kd_weight,
            label_smoothing=config.label_smoothing,
        ).backward()
    return loss.item()


# ------------------------------------------------------------------------------ checkpoints


def _save(
    path: Path,
    supernet: Supernet,
    space: SearchSpace,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    report: TrainReport,
) -> None:
    """Tensors and plain types only (loads with ``weights_only=True``); replaced atomically."""
    state = {
        "space": space.name,
        "config": config.to_dict(),
        "epoch": len(report.losses),
        "losses": report.losses,
        "model": supernet.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_numpy": json.dumps(rng.bit_generator.state),
        "rng_python": json.dumps(random.getstate()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, *, space: SearchSpace | None = None, config: TrainConfig | None = None
) -> dict[str, Any]:
    """Read a supernet checkpoint safely; refuse one written for another space or config.

    ``state["model"]`` is the supernet's state_dict; ``state["epoch"]`` the epochs it holds.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types on damaged or unsafe files
        raise AutocompError(f"cannot read supernet checkpoint {path}: {err}") from None
    if not isinstance(state, dict) or not {"space", "config", "epoch", "model"} <= state.keys():
        raise AutocompError(f"{path} is not a supernet checkpoint")
    if space is not None and state["space"] != space.name:
        raise AutocompError(f"checkpoint {path} is of space {state['space']!r}, not {space.name!r}")
    if config is not None:
        ours = config.to_dict()
        differ = [
            f"{k}: {state['config'].get(k)!r} there, {v!r} here"
            for k, v in ours.items()
            if k != "num_threads" and state["config"].get(k) != v
        ]
        if differ:
            raise AutocompError(
                f"checkpoint {path} was trained with another config ({'; '.join(differ)}); "
                "use the same settings to resume, or another checkpoint path"
            )
    return state


def _restore(
    state: dict[str, Any],
    supernet: Supernet,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    path: Path,
) -> None:
    try:
        supernet.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise AutocompError(f"checkpoint {path} does not fit this supernet: {first}") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    rng.bit_generator.state = json.loads(state["rng_numpy"])
    version, internal, gauss = json.loads(state["rng_python"])
    random.setstate((version, tuple(internal), gauss))


# ------------------------------------------------------------------------------- evaluation


def evaluate(
    model: nn.Module,
    split: tuple[np.ndarray | Tensor, np.ndarray | Tensor],
    resolution: int,
    batch_size: int = 128,
) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``split = (images, labels)`` at ``resolution``."""
    images, labels = split
    hits = _logits(model, images, resolution, batch_size).argmax(1) == torch.as_tensor(labels)
    return int(hits.sum()) / len(labels)


def cross_entropy(
    model: nn.Module,
    split: tuple[np.ndarray | Tensor, np.ndarray | Tensor],
    resolution: int,
    batch_size: int = 128,
) -> float:
    """Mean cross-entropy of ``model`` (eval mode) on ``split``: unlike top-1 accuracy it counts
    how sure every prediction is, so it still tells apart models whose accuracies tie on a few
    hundred images."""
    images, labels = split
    logits = _logits(model, images, resolution, batch_size)
    return float(F.cross_entropy(logits, torch.as_tensor(labels).long()))


def calibration_batches(
    images: np.ndarray, *, count: int = 512, batch_size: int = 128, seed: int = 0
) -> list[Tensor]:
    """A fixed random subset of (training-split) ``images`` for BN recalibration, in batches.

    Reusing one subset for every candidate makes their scores comparable and reproducible.
    """
    index = np.random.default_rng(seed).permutation(len(images))[:count]
    return list(torch.from_numpy(images[np.sort(index)]).split(batch_size))


def evaluate_subnet(
    supernet: Supernet,
    candidate: Candidate,
    bn_batches: Sequence[Tensor],
    eval_split: tuple[np.ndarray | Tensor, np.ndarray | Tensor],
    *,
    batch_size: int = 128,
) -> float:
    """Accuracy a candidate inherits from the supernet, as deployed: int8 layers fake-quantized.

    Activates ``candidate``, recomputes BatchNorm statistics and activation ranges from
    ``bn_batches`` (training-split images at any resolution, resized here) and scores
    ``eval_split``. The candidate stays active, with its recalibrated statistics and fake
    quantization on, so ``space.build(candidate, supernet=supernet)`` extracts what was scored.
    """
    images, labels = eval_split
    out = subnet_logits(supernet, candidate, bn_batches, images, batch_size=batch_size)
    return int((out.argmax(1) == torch.as_tensor(labels)).sum()) / len(labels)


def subnet_logits(
    supernet: Supernet,
    candidate: Candidate,
    bn_batches: Sequence[Tensor],
    images: np.ndarray | Tensor,
    *,
    batch_size: int = 128,
) -> Tensor:
    """The (n, classes) outputs behind :func:`evaluate_subnet`, for per-image analyses."""
    supernet.set_active(candidate)
    supernet.set_quantization(True)
    for module in supernet.modules():
        if isinstance(module, ActQuant):
            module.initialized.fill_(False)  # ranges of this subnet only, like its BN statistics
    recalibrate_bn(supernet, (view(b, candidate.resolution) for b in bn_batches))
    return _logits(supernet, images, candidate.resolution, batch_size)


@torch.inference_mode()
def _logits(model: nn.Module, images: np.ndarray | Tensor, resolution: int, batch: int) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(view(x, resolution)) for x in torch.as_tensor(images).split(batch)])
    finally:
        model.train(was_training)
