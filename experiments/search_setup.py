"""Shared setting of the search experiments: data, a quickly trained mbv3 supernet, evaluation.

The built-in ``mbv3`` space spans resolutions 32–160; on this shared 2-core CPU one sandwich step
of its supernet at 160² takes ~40 s, so it cannot be trained here in reasonable time. The
experiments use the same space restricted to resolutions 32 and 40 ("mbv3-digits": same stages,
widths, kernels, expand ratios, keep ratios and bits; the images are 8×8 or 16×16 anyway), with
its supernet trained for 24 epochs (sandwich rule with OFA's progressive shrinking: with the plain
sandwich rule, subnets that mix choices scored below both the largest and the smallest, e.g. the
largest with 3×3 kernels 39 % vs the smallest 55 %, so their accuracies had almost no structure)
on the training part of a stratified validation split of the dataset's *training* split.
Candidates are scored on that validation part (BN recalibrated on 512 training-part images); the
test split is never loaded into the search. The dataset is ``digits_hard``
(experiments/make_hard_digits.py) unless ``SEARCH_DATA`` names another spec, e.g.
``SEARCH_DATA=digits``. Direct evaluations are cached by candidate key (JSON) so that the scripts
can share and re-run them. Checkpoint and cache live in ``runs/search-experiments/<dataset>/``.

    nice -n 5 python experiments/search_setup.py     # train (or finish training) the supernet
"""

from __future__ import annotations

import json
import os
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import yaml

from autocomp.data import ImageDataset, load
from autocomp.spaces import Candidate, SearchSpace, get_space
from autocomp.supernet.supernet import Supernet
from autocomp.supernet.train import (
    PHASES,
    TrainConfig,
    calibration_batches,
    evaluate_subnet,
    load_checkpoint,
    train_supernet,
)

ROOT = Path(__file__).resolve().parents[1]
#: digits_hard (experiments/make_hard_digits.py): on plain digits every subnet scores 94–99 %,
#: differences within the validation noise, so rankings there say little about a search.
DATA = os.environ.get("SEARCH_DATA", f"npz:{ROOT / 'experiments' / 'data' / 'digits_hard.npz'}")
RUN = ROOT / "runs" / "search-experiments" / Path(DATA.partition(":")[2] or DATA).stem
RESOLUTIONS = [32, 40]
TRAIN = TrainConfig(  # every field pinned: the trainer's defaults move, these results must not
    epochs=24,
    batch_size=64,
    lr=0.05,
    weight_decay=5e-5,
    optimizer="sgd",
    warmup_epochs=1.0,
    sandwich_random=2,
    kd_temperature=1.0,
    kd_weight=1.0,
    label_smoothing=0.1,
    augment=0.1,
    resolution_power=1.0,
    teacher_resolution="sample",
    progressive=True,  # OFA's progressive shrinking: see the module docstring
    phases=PHASES,
    qat_epochs=2,
    seed=0,
    num_threads=1,
)
VALIDATION_FRACTION = 0.3


def quick_space() -> SearchSpace:
    """The built-in mbv3 space at resolutions 32 and 40, for 1-channel 10-class digits."""
    config = yaml.safe_load(files("autocomp.builtin_spaces").joinpath("mbv3.yaml").read_text())
    config["resolution"] = RESOLUTIONS
    RUN.mkdir(parents=True, exist_ok=True)
    path = RUN / "mbv3-digits.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return get_space(str(path), num_classes=10, in_channels=1)


def validation_data() -> ImageDataset:
    """The training split, cut into a part to train on and a validation part to score on."""
    return load(DATA).validation_split(VALIDATION_FRACTION, seed=0)


def trained_supernet(space: SearchSpace, data: ImageDataset, progress: bool = True) -> Supernet:
    """Train the supernet (resumable). A finished checkpoint is only loaded, whatever the training
    recipe's defaults have become since: the evaluations cached beside it belong to its weights."""
    torch.set_num_threads(1)
    supernet = space.supernet()
    path = RUN / "supernet.pt"
    if path.exists():
        state = load_checkpoint(path, space=space)
        if state["epoch"] >= state["config"]["epochs"]:
            supernet.load_state_dict(state["model"])
            return supernet
    start = time.perf_counter()
    report = train_supernet(supernet, space, data, TRAIN, checkpoint=path, progress=progress)
    print(
        f"supernet: trained epochs {report.start_epoch + 1}-{TRAIN.epochs} in "
        f"{time.perf_counter() - start:.0f} s, losses {np.round(report.losses, 3).tolist()}"
    )
    return supernet


class Evaluator:
    """``evaluate_fn`` for the controller: supernet accuracy after BN recalibration, cached."""

    def __init__(self, space: SearchSpace, supernet: Supernet, data: ImageDataset) -> None:
        self.space = space
        self.supernet = supernet
        self.bn = calibration_batches(data.x_train, count=512, batch_size=128, seed=0)
        self.split = (data.x_test, data.y_test)  # the validation part, never the test split
        self.path = RUN / "evaluations.json"
        self.cache: dict[str, float] = (
            json.loads(self.path.read_text()) if self.path.exists() else {}
        )
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, candidate: Candidate) -> float:
        key = candidate.key()
        if key not in self.cache:
            start = time.perf_counter()
            self.cache[key] = evaluate_subnet(self.supernet, candidate, self.bn, self.split)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.cache))
            os.replace(tmp, self.path)
        return self.cache[key]


def setting(progress: bool = True) -> tuple[SearchSpace, ImageDataset, Evaluator]:
    space, data = quick_space(), validation_data()
    return space, data, Evaluator(space, trained_supernet(space, data, progress), data)


if __name__ == "__main__":
    space, data, evaluate = setting()
    for name, c in (("smallest", space.smallest()), ("largest", space.largest())):
        print(
            f"{name}: {space.cost(c).macs / 1e6:.2f}M MACs, validation accuracy {evaluate(c):.4f}"
        )
