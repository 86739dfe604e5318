"""Briefly trained tiny models shared by the finetune and export tests (trained once a session).

The cached values are state dicts; every caller builds its own model from them, so no test can
change another's starting point.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path

import numpy as np
import torch
from tiny_spaces import tiny_space

from autocomp import data
from autocomp.finetune import FinetuneConfig, finetune
from autocomp.quant.fake import set_quantization
from autocomp.spaces import Candidate, SearchSpace

RESOLUTION = 16  # the student candidate's side
TEACHER_RESOLUTION = 16
QUICK = {"optimizer": "adamw", "lr": 0.01, "batch_size": 32, "augment": 0.0, "seed": 0}


@functools.cache
def space() -> SearchSpace:
    with tempfile.TemporaryDirectory() as folder:
        return tiny_space("mbv3", Path(folder), num_classes=10, in_channels=1)


@functools.cache
def digits() -> tuple[data.ImageDataset, data.ImageDataset]:
    """The digits dataset and its validation carve-out (validation = the latter's test split)."""
    full = data.load("digits")
    return full, full.validation_split(0.2, seed=0)


def splits():
    """(train, validation, test) as (images, labels) pairs; test is never used for training."""
    full, val = digits()
    return (val.x_train, val.y_train), (val.x_test, val.y_test), (full.x_test, full.y_test)


def student_candidate() -> Candidate:
    """A small candidate with a mix of int8 and fp32 layers (9 of 18 int8), at 16 px."""
    return dataclasses.replace(space().sample(np.random.default_rng(0)), resolution=RESOLUTION)


def build(candidate: Candidate, state: dict | None = None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = space().build(candidate)
    if state is not None:
        model.load_state_dict(state)
    return model


@functools.cache
def teacher_state() -> dict:
    """The tiny space's largest network, trained on the labels at 16 px."""
    model = build(space().largest())
    train, val, _ = splits()
    config = FinetuneConfig(epochs=3, qat_epochs=0, **QUICK)
    finetune(model, None, train, val, config, resolution=TEACHER_RESOLUTION, progress=False)
    return model.state_dict()


def teacher() -> torch.nn.Module:
    return build(space().largest(), teacher_state()).eval()


@functools.cache
def student_state() -> dict:
    """The student candidate after labels-only training and a QAT epoch (observers trained)."""
    model = build(student_candidate())
    train, val, _ = splits()
    config = FinetuneConfig(epochs=5, qat_epochs=1, **QUICK)
    finetune(model, None, train, val, config, resolution=RESOLUTION, progress=False)
    return model.state_dict()


def student() -> torch.nn.Module:
    """The trained student in eval mode, its int8 layers fake-quantized (as deployed)."""
    return set_quantization(build(student_candidate(), student_state()).eval(), True)
