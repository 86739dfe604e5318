"""Write ``experiments/data/digits_hard.npz``: scikit-learn's digits, distorted, as an npz dataset.

Why this dataset: it must be harder than ``digits`` and available offline (no downloads at any
time), so it is derived from the embedded digits deterministically. Each 8×8 digit is upsampled
to 16×16 and given a random affine (rotation ±25°, scale 0.8–1.2, shear ±0.25, shift ±2 px), a
random contrast and brightness, Gaussian noise and, half of the time, an occluding block. Digits
keep their labels and their train/test split (the same stratified split as the ``digits`` spec);
the test split gets three distorted copies of each image so that accuracies are less noisy.
Where small networks score ~98 % on ``digits``, they score clearly less here and differ more,
which is what a ranking experiment needs.

    python experiments/make_hard_digits.py  # then use the spec npz:experiments/data/digits_hard.npz
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

OUT = Path(__file__).parent / "data" / "digits_hard.npz"
SIDE = 16


def distort(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 N×16×16 distorted copies of [0, 1] float N×8×8 digits."""
    n = len(images)
    x = F.interpolate(torch.from_numpy(images)[:, None], size=(SIDE, SIDE), mode="bilinear")
    angle = np.radians(rng.uniform(-25, 25, n))
    scale = rng.uniform(0.8, 1.2, n)
    shear = rng.uniform(-0.25, 0.25, n)
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = np.cos(angle) / scale
    theta[:, 0, 1] = (-np.sin(angle) + shear) / scale
    theta[:, 1, 0] = np.sin(angle) / scale
    theta[:, 1, 1] = np.cos(angle) / scale
    theta[:, :, 2] = rng.uniform(-1, 1, (n, 2)) * (2 * 2 / SIDE)  # ±2 px in grid units
    grid = F.affine_grid(torch.from_numpy(theta), [n, 1, SIDE, SIDE], align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False)[:, 0].numpy()
    contrast = rng.uniform(0.5, 1.0, (n, 1, 1))
    brightness = rng.uniform(0.0, 0.3, (n, 1, 1))
    x = x * contrast + brightness + rng.normal(0, 0.15, x.shape)
    for i in np.flatnonzero(rng.random(n) < 0.5):
        h, w = rng.integers(3, 7, 2)
        top, left = rng.integers(0, SIDE - h), rng.integers(0, SIDE - w)
        x[i, top : top + h, left : left + w] = rng.uniform(0, 1)
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def main() -> None:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=360, stratify=y, random_state=0
    )
    rng = np.random.default_rng(0)
    copies = 3
    arrays = {
        "x_train": distort(x_train, rng),
        "y_train": y_train,
        "x_test": distort(np.concatenate([x_test] * copies), rng),
        "y_test": np.concatenate([y_test] * copies),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    size = math.ceil(OUT.stat().st_size / 1024)
    print(f"wrote {OUT} ({size} KiB): {len(y_train)} train, {len(arrays['y_test'])} test images")


if __name__ == "__main__":
    main()
