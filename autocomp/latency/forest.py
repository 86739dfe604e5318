"""Gradient-boosted trees as plain arrays: fitted with scikit-learn, stored in npz, run by numpy.

Storing sklearn estimators would need pickle; instead the fitted trees are flattened into five
node arrays and predicted by walking every tree for every row at once, level by level. The walk
compares in float32 like scikit-learn does, so predictions are identical to the estimator's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import GradientBoostingRegressor

ARRAYS = ("feature", "threshold", "left", "right", "value", "roots")


@dataclass(frozen=True)
class Forest:
    """Sum of regression trees plus a constant: ``init + sum_t value[leaf_t(x)]``."""

    feature: np.ndarray  # int32, per node; leaves hold 0
    threshold: np.ndarray  # float64, go left when x[feature] <= threshold
    left: np.ndarray  # int32, absolute child index; -1 at leaves
    right: np.ndarray  # int32
    value: np.ndarray  # float64, leaf contribution (already scaled by the learning rate)
    roots: np.ndarray  # int32, index of each tree's root
    init: float
    depth: int

    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        y: np.ndarray,
        *,
        n_estimators: int = 300,
        max_depth: int = 5,
        learning_rate: float = 0.05,
        subsample: float = 0.8,
        min_samples_leaf: int = 3,
        random_state: int = 0,
    ) -> Forest:
        """Fit scikit-learn's gradient boosting (squared error) and flatten it."""
        est = GradientBoostingRegressor(
            n_estimators=n_estimators,
            max_depth=max_depth,
            learning_rate=learning_rate,
            subsample=subsample,
            min_samples_leaf=min_samples_leaf,
            random_state=random_state,
        ).fit(X, y)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS[:-1]}
        roots, offset, depth = [], 0, 0
        for tree in est.estimators_[:, 0]:
            t = tree.tree_
            leaf = t.children_left < 0
            roots.append(offset)
            parts["feature"].append(np.where(leaf, 0, t.feature))
            parts["threshold"].append(np.where(leaf, 0.0, t.threshold))
            parts["left"].append(np.where(leaf, -1, t.children_left + offset))
            parts["right"].append(np.where(leaf, -1, t.children_right + offset))
            parts["value"].append(t.value[:, 0, 0] * learning_rate)
            offset += t.node_count
            depth = max(depth, t.max_depth)
        return cls(
            feature=np.concatenate(parts["feature"]).astype(np.int32),
            threshold=np.concatenate(parts["threshold"]).astype(np.float64),
            left=np.concatenate(parts["left"]).astype(np.int32),
            right=np.concatenate(parts["right"]).astype(np.int32),
            value=np.concatenate(parts["value"]).astype(np.float64),
            roots=np.asarray(roots, dtype=np.int32),
            init=float(est.init_.constant_.ravel()[0]),
            depth=int(depth),
        )

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Vectorised over rows and trees: ``depth`` gathers of a (trees, rows) index array,
        in blocks of rows that keep the working set in cache."""
        X = np.asarray(X, dtype=np.float32).astype(np.float64)
        out = np.empty(X.shape[0])
        # Leaves point to themselves, so walking past a leaf stays there.
        idx = np.arange(len(self.left))
        children = np.stack(
            [np.where(self.left < 0, idx, self.left), np.where(self.right < 0, idx, self.right)]
        )
        block = max(1, 2**16 // max(len(self.roots), 1))
        for start in range(0, X.shape[0], block):
            xb = X[start : start + block]
            flat = xb.ravel()
            offsets = np.arange(xb.shape[0]) * xb.shape[1]
            node = np.repeat(self.roots[:, None], xb.shape[0], axis=1)
            for _ in range(self.depth):
                right = flat[offsets + self.feature[node]] > self.threshold[node]
                node = children[right.view(np.int8), node]
            out[start : start + block] = self.init + self.value[node].sum(axis=0)
        return out

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}{name}": getattr(self, name) for name in ARRAYS}
        out[f"{prefix}scalars"] = np.asarray([self.init, self.depth], dtype=np.float64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> Forest:
        init, depth = arrays[f"{prefix}scalars"]
        forest = cls(
            **{name: arrays[f"{prefix}{name}"] for name in ARRAYS},
            init=float(init),
            depth=int(depth),
        )
        n = forest.feature.shape[0]
        if not all(getattr(forest, a).shape == (n,) for a in ARRAYS[:-1]) or (
            forest.left.max(initial=-1) >= n
            or forest.right.max(initial=-1) >= n
            or forest.roots.max(initial=0) >= max(n, 1)
        ):
            raise ValueError(f"inconsistent tree arrays under {prefix!r}")
        return forest
