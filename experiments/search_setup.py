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

The validation part holds only 432 images, and that makes a direct evaluation noisy: scored on two
random halves of it, 100 random candidates rank with Kendall τ 0.53, so even an oracle of each
candidate's expected accuracy would agree with the 432-image score at τ ≈ 0.75 only (see
experiments/accuracy_predictor.py, which measures this ceiling). On ``digits_hard`` the validation
part is therefore scored ``VALIDATION_COPIES`` times (default 4, env ``SEARCH_VALIDATION_COPIES``):
the images themselves plus fresh distortions of the same source digits (make_hard_digits.distort,
other seeds), as make_hard_digits gives the test split three copies. The new copies derive from
the validation part's source digits only, which the supernet never trained on, and the test split
is still never touched. With 4 copies the split-half τ rises to 0.72 (ceiling ≈ 0.85).

    nice -n 5 python experiments/search_setup.py     # train (or finish training) the supernet
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from autocomp.data import DIGITS_TEST_SIZE, ImageDataset, load
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
HARD_DIGITS = ROOT / "experiments" / "data" / "digits_hard.npz"
DATA = os.environ.get("SEARCH_DATA", f"npz:{HARD_DIGITS}")
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
#: Times the validation part of digits_hard is scored (1: its images only); see the docstring.
VALIDATION_COPIES = int(os.environ.get("SEARCH_VALIDATION_COPIES", "4"))


def quick_space() -> SearchSpace:
    """The built-in mbv3 space at resolutions 32 and 40, for 1-channel 10-class digits."""
    config = yaml.safe_load(files("autocomp.builtin_spaces").joinpath("mbv3.yaml").read_text())
    config["resolution"] = RESOLUTIONS
    RUN.mkdir(parents=True, exist_ok=True)
    path = RUN / "mbv3-digits.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return get_space(str(path), num_classes=10, in_channels=1)


def validation_data() -> ImageDataset:
    """The training split, cut into a part to train on and a validation part to score on (on
    digits_hard, with ``VALIDATION_COPIES - 1`` fresh distortions of the validation digits)."""
    data = load(DATA).validation_split(VALIDATION_FRACTION, seed=0)
    copies = validation_copies()
    return data if copies == 1 else _with_copies(data, copies)


def validation_copies() -> int:
    """How many times each validation image is scored (fresh distortions: digits_hard only)."""
    if VALIDATION_COPIES < 1:
        raise SystemExit(f"SEARCH_VALIDATION_COPIES must be at least 1, not {VALIDATION_COPIES}")
    return VALIDATION_COPIES if _is_hard_digits() else 1


def validation_groups(data: ImageDataset) -> np.ndarray:
    """For each validation image, the index of its source image (copies share it): what a
    split-half reliability estimate must split on."""
    return np.arange(len(data.y_test)) % (len(data.y_test) // validation_copies())


def _is_hard_digits() -> bool:
    kind, _, arg = DATA.partition(":")
    path = Path(arg if kind == "npz" else DATA)
    return path.suffix == ".npz" and path.resolve() == HARD_DIGITS.resolve()


def _with_copies(data: ImageDataset, copies: int) -> ImageDataset:
    """``data`` whose validation part is followed by ``copies - 1`` new distortions of its source
    digits, normalised like the rest; checks that it finds the very digits the file was made of."""
    from make_hard_digits import distort

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    source, _, y_source, _ = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, stratify=y, random_state=0
    )
    if not np.array_equal(
        distort(source, np.random.default_rng(0)), np.load(HARD_DIGITS)["x_train"]
    ):
        raise SystemExit(f"{HARD_DIGITS} was not made by make_hard_digits.py: run it again")
    # The same stratified cut as ImageDataset.validation_split (it depends on the labels only).
    _, picked = train_test_split(
        np.arange(len(y_source)),
        test_size=VALIDATION_FRACTION,
        stratify=y_source,
        random_state=0,
    )
    assert np.array_equal(y_source[picked], data.y_test)
    mean, std = data.mean[0], data.std[0]
    extra = [
        (distort(source[picked], np.random.default_rng(100 + k)) / np.float32(255) - mean) / std
        for k in range(1, copies)
    ]
    x_val = np.concatenate([data.x_test, *(e[:, None].astype(np.float32) for e in extra)])
    return replace(data, x_test=x_val, y_test=np.tile(data.y_test, copies))


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
        copies = validation_copies()
        self.path = RUN / (
            "evaluations.json" if copies == 1 else f"evaluations-{copies}copies.json"
        )
        self.groups = validation_groups(data)
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
