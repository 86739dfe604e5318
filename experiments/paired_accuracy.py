"""Are two exported models' test accuracies different, or is it the test set's luck?

Both ONNX models answer every test image (ONNX Runtime, each at its own input resolution, read
from the model); the images only one of them gets right decide (exact two-sided McNemar test:
under "equally accurate" each such image is a fair coin). A paired test is far sharper than
comparing two accuracies' standard errors, as both models see the same hard images.

    python experiments/paired_accuracy.py A.onnx B.onnx [--data npz:PATH]   # default digits_hard
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import onnx

from autocomp import data
from autocomp.quant.export import onnx_predictions

DATA = "npz:experiments/data/digits_hard.npz"


def mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> tuple[int, int, float]:
    """Images only A gets right, only B gets right, and the exact two-sided McNemar p-value."""
    only_a, only_b = int((a_right & ~b_right).sum()), int((~a_right & b_right).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return only_a, only_b, p


def right_answers(path: Path, dataset: data.ImageDataset) -> np.ndarray:
    """Which test images the ONNX model at ``path`` classifies correctly."""
    side = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    return onnx_predictions(path, dataset.x_test, side) == np.asarray(dataset.y_test)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--data", default=DATA)
    args = parser.parse_args()
    dataset = data.load(args.data)
    a, b = right_answers(args.a, dataset), right_answers(args.b, dataset)
    only_a, only_b, p = mcnemar(a, b)
    print(f"{len(a)} test images: A {a.mean():.2%}, B {b.mean():.2%}")
    print(f"right only by A {only_a}, only by B {only_b}: exact McNemar p = {p:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
