"""Latency predictors with a scikit-learn feel, stored as npz (numbers only, never pickle).

* :class:`KernelPredictor` (nn-Meter style): one regressor per kernel type (``nchwc.Conv``,
  ``ms.QLinearConv.dw``, ``Add``...) over :mod:`~autocomp.latency.kernels` features; a model's
  latency is the sum of its kernels plus a learned per-model overhead. Each regressor predicts
  the kernel's time *per unit of work* (MACs plus elements moved), in log space, with boosted
  trees: trees extrapolate as constants, and a constant time per unit of work is what a kernel
  larger than any seen converges to (a compute-bound convolution's MAC rate), whereas a constant
  *time* would be wrong by the ratio of sizes. Works on any ONNX CNN.
* :class:`ArchPredictor`: boosted trees over ``SearchSpace.encode`` vectors, log-latency target;
  predicting 10^4 candidates takes milliseconds.
* :class:`LutPredictor`: an additive lookup table, one latency per (column, value) of an
  encoding (OFA/FBNet's per-block table), fitted by ridge least squares.

Every file records the format version, kind, device profile (``DeviceInfo.to_dict()``), ONNX
Runtime version, feature names and a SHA-256 of its arrays. :func:`load` refuses anything
corrupt, truncated, of another version or, when a device is named, of another profile.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from scipy.optimize import nnls

from autocomp.errors import AutocompError
from autocomp.hardware.base import DeviceInfo, OnnxModel
from autocomp.latency.forest import Forest
from autocomp.latency.kernels import (
    FEATURE_NAMES,
    PROFILE_NAMES,
    Kernel,
    extract_kernels,
    feature_matrix,
)

FORMAT = "autocomp-latency-predictor"
FORMAT_VERSION = 5  # 5: kernel features carry the matrix-product shape (M, N, K)
FALLBACK = "*"  # the regressor for kernel types seen too rarely (or never) in training
_MACS = FEATURE_NAMES.index("macs")
_INT8_IN = FEATURE_NAMES.index("int8_in")
#: Per-model correction inputs: a model's whole-graph context that per-kernel predictions miss.
MODEL_CONTEXT = (
    "intercept",
    "log_predicted_ms",
    "log_predicted_ms_squared",
    "log_weight_bytes",
    "log_activation_bytes",
    "int8_time_share",
)
_WEIGHT_BYTES, _IN_BYTES, _OUT_BYTES = (
    FEATURE_NAMES.index(n) for n in ("bytes_weight", "bytes_in", "bytes_out")
)
#: Per-model overhead inputs: the microbenchmarked kernels run with their weights and inputs hot
#: in cache; inside a model they arrive from memory (profiled in-model, the classifier Gemm of
#: mobilenetv3 takes 5x its micro-benchmark), so a model costs a constant per kernel and per MB
#: of weights and of activations streamed, on top of its kernels' own times.
OVERHEAD_INPUTS = ("kernel_sum_ms", "kernels", "weight_mb", "activation_mb", "constant")
_ELEMS = [FEATURE_NAMES.index(n) for n in ("elems_in", "elems_out", "weight_elems")]
#: Columns of :func:`feature_matrix` the per-kernel regressors see: the kernel and the profile it
#: runs under, not the model context (a kernel's own time does not depend on its neighbours; how
#: they interact is the per-model part).
_KERNEL_COLUMNS = len(FEATURE_NAMES) + len(PROFILE_NAMES)


class _Predictor(ABC):
    """Shared persistence: ``save``/``load`` of parameters, small state and arrays."""

    kind = ""

    def __init__(self, device: DeviceInfo | None = None):
        self.device = device

    def _params(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able scalars and named arrays that :meth:`_set_state` restores."""

    @abstractmethod
    def _set_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore fitted attributes; raise ValueError/KeyError on inconsistent contents."""

    @property
    def feature_names(self) -> list[str]:
        return list(getattr(self, "feature_names_", []))

    def save(self, path: str | Path) -> Path:
        """Write the fitted predictor to ``path`` (npz) atomically."""
        if not hasattr(self, "fitted_"):
            raise AutocompError(f"cannot save an unfitted {type(self).__name__}; call fit first")
        state, arrays = self._state()
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "device": self.device.to_dict() if self.device else None,
            "ort_version": ort.__version__,
            "feature_names": self.feature_names,
            "params": self._params(),
            "state": state,
            "sha256": _digest(arrays),
        }
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, __meta__=np.asarray(json.dumps(meta)), **arrays)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared predictor
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, device_info: DeviceInfo | None = None) -> _Predictor:
        """Load any predictor kind saved by :meth:`save` (see :func:`load`)."""
        return load(path, device_info)


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class OutdatedPredictorError(AutocompError):
    """A predictor file of another format version: refit it (from its measurements, if kept)."""


def _corrupt(path: Path, why: str) -> AutocompError:
    return AutocompError(f"corrupt predictor file {path}: {why}")


def load(path: str | Path, device_info: DeviceInfo | None = None) -> _Predictor:
    """Read a predictor file, validating format, version, integrity and (if given) the profile."""
    path = Path(path)
    if not path.is_file():
        raise AutocompError(f"predictor file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise _corrupt(path, f"not a readable npz archive ({type(err).__name__})") from None
    try:
        meta = json.loads(str(arrays.pop("__meta__")))
    except (KeyError, ValueError):
        raise _corrupt(path, "no metadata") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AutocompError(f"{path} is not an autocomp latency predictor")
    if meta.get("version") != FORMAT_VERSION:
        raise OutdatedPredictorError(
            f"{path}: predictor format version {meta.get('version')} is not supported (this "
            f"autocomp reads version {FORMAT_VERSION}); refit it with 'autocomp predictor fit'"
        )
    if meta.get("sha256") != _digest(arrays):
        raise _corrupt(path, "checksum mismatch")
    kinds = {c.kind: c for c in (KernelPredictor, ArchPredictor, LutPredictor)}
    if meta.get("kind") not in kinds:
        raise _corrupt(path, f"unknown predictor kind {meta.get('kind')!r}")
    device = DeviceInfo.from_dict(meta["device"]) if meta.get("device") else None
    if device_info is not None:
        have = device.profile if device else "none"
        if have != device_info.profile:
            raise AutocompError(
                f"{path}: predictor was fitted for device profile {have}, not "
                f"{device_info.profile}; fit one for this device ('autocomp predictor fit') or "
                "let autocomp adapt one (load_predictor(..., device=...))"
            )
    predictor = kinds[meta["kind"]](**meta["params"], device=device)
    try:
        predictor.feature_names_ = list(meta["feature_names"])
        predictor._set_state(meta["state"], arrays)
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise _corrupt(path, f"inconsistent contents ({err})") from None
    predictor.fitted_ = True
    predictor.ort_version_ = meta.get("ort_version")
    return predictor


def fit_nonnegative(A: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Non-negative ``coef`` minimising the *relative* error of ``A @ coef`` against ``t``."""
    A = A / t[:, None]
    scale = np.maximum(np.abs(A).max(axis=0), 1e-30)
    coef, _ = nnls(A / scale, np.ones(len(t)))
    return coef / scale


def regressor_key(kernel: Kernel) -> str:
    """Which regressor predicts ``kernel``: its :attr:`~Kernel.key`, with ORT's fused variants
    of a kernel (``ms.FusedConv`` = ``Conv`` + activation, ``ms.FusedGemm``) pooled with the
    plain one, since they run the same MLAS routine and the activation is a feature."""
    key = kernel.key
    return key.replace("ms.Fused", "", 1) if key.startswith("ms.Fused") else key


def kernel_work(X: np.ndarray) -> np.ndarray:
    """Work of each kernel row of :func:`feature_matrix`: MACs plus elements read and written
    (weights included), plus a constant for the fixed cost of a call."""
    return X[:, _MACS] + X[:, _ELEMS].sum(axis=1) + 16.0


class KernelPredictor(_Predictor):
    """Sum of per-kernel predictions plus a per-model overhead, for any ONNX model.

    ``fit(models, y, kernel_times)``: ``models`` are kernel lists (:func:`extract_kernels`),
    ``y`` the measured model latencies (ms) and ``kernel_times`` each model's kernel times (ms,
    by kernel name): micro-benchmarked ones (:mod:`~autocomp.latency.microbench`) or profiled
    node times. Kernel types with fewer than ``min_samples`` timed kernels share a fallback
    regressor, which also serves types never seen in training.

    The per-model overhead is linear in :data:`OVERHEAD_INPUTS` (the kernels' sum, their count,
    the MB of weights and of activations they stream, a constant) times ``exp(context @ w)``,
    both fitted on the *measured* kernel sums: ``w`` is a ridge fit of the remaining log ratio
    against :data:`MODEL_CONTEXT` (model size, weight and activation bytes, int8 share), i.e.
    what the kernels of one model do to each other through the caches and the executor (a model
    of many small kernels runs ~25% slower than its kernels alone, a large one ~5%).
    ``context=False`` leaves it out.

    ``normalize``: make each model's kernel times sum to its measured latency (see
    :func:`timed_kernels`), for *profiled* node times: the timed runs (profiler off) are the
    truth and the profile says how that time splits across kernels. Micro-benchmarked times are
    used as they are (``normalize=False``, the default).
    """

    kind = "kernel"

    def __init__(
        self,
        n_estimators: int = 300,
        max_depth: int = 5,
        learning_rate: float = 0.05,
        min_samples: int = 30,
        normalize: bool = False,
        context: bool = True,
        random_state: int = 0,
        device: DeviceInfo | None = None,
    ):
        super().__init__(device)
        self.normalize = normalize
        self.context = context
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.min_samples = min_samples
        self.random_state = random_state

    def _params(self) -> dict[str, Any]:
        return {
            "n_estimators": self.n_estimators,
            "max_depth": self.max_depth,
            "learning_rate": self.learning_rate,
            "min_samples": self.min_samples,
            "normalize": self.normalize,
            "context": self.context,
            "random_state": self.random_state,
        }

    @property
    def threads(self) -> int:
        """Intra-op threads of the profile it predicts (1 without a device)."""
        return self.device.threads if self.device is not None else 1

    def fit(
        self,
        models: Sequence[Sequence[Kernel]],
        y: Sequence[float],
        kernel_times: Sequence[Mapping[str, float]],
        threads: Sequence[int] | None = None,
    ) -> KernelPredictor:
        """Fit per-kernel-type regressors on node times, then the per-model overhead on ``y``.

        ``threads``: each model's intra-op thread count when they were measured under several
        (pooled measurements, ``transfer``); by default all ran on this predictor's profile."""
        if threads is None:
            threads = [self.threads] * len(models)
        if not (len(models) == len(y) == len(kernel_times) == len(threads)) or not models:
            raise AutocompError(
                "fit needs as many kernel lists, latencies, node-time maps and thread counts"
            )
        y = np.asarray(y, dtype=np.float64)
        kernel_times = timed_kernels(models, y, kernel_times, self.normalize)
        matrices = [feature_matrix(ks, t) for ks, t in zip(models, threads, strict=True)]
        kernels, times, rows = [], [], []
        for ks, nt, X in zip(models, kernel_times, matrices, strict=True):
            timed = [i for i, k in enumerate(ks) if k.name in nt]
            if timed:
                rows.append(X[timed])
                kernels += [ks[i] for i in timed]
                times += [nt[ks[i].name] for i in timed]
        if not kernels:
            raise AutocompError(
                "no kernel has a measured time: build the dataset with 'autocomp measure --out'"
            )
        X, t = np.vstack(rows), np.asarray(times)
        keys = np.asarray([regressor_key(k) for k in kernels])
        names, counts = np.unique(keys, return_counts=True)
        self.keys_ = sorted(
            str(k) for k, c in zip(names, counts, strict=True) if c >= self.min_samples
        )
        self.models_: dict[str, tuple[np.ndarray, Forest | None]] = {}
        for key in [*self.keys_, FALLBACK]:
            rows = ~np.isin(keys, self.keys_) if key == FALLBACK else keys == key
            if not rows.any():
                rows = np.ones(len(t), dtype=bool)
            self.models_[key] = self._fit_type(X[rows], t[rows])
        self.feature_names_ = [*FEATURE_NAMES, *PROFILE_NAMES]
        self.correction_: dict[str, np.ndarray] = {}
        kept = np.asarray([bool(nt) for nt in kernel_times])
        A = overhead_inputs(matrices, [sum(nt.values()) for nt in kernel_times])
        self.overhead_ = _fit_overhead(A[kept], y[kept])
        self.model_correction_ = np.zeros(len(MODEL_CONTEXT))
        if self.context and kept.sum() >= 2 * len(MODEL_CONTEXT):
            base = A @ self.overhead_
            per_kernel = [
                np.asarray([nt.get(k.name, 0.0) for k in ks])
                for ks, nt in zip(models, kernel_times, strict=True)
            ]
            C = self._context(matrices, per_kernel, base)[kept]
            reg = np.diag([0.0] + [1.0] * (C.shape[1] - 1))  # shrink all but the intercept
            target = np.log(y[kept]) - np.log(np.maximum(base[kept], 1e-9))
            self.model_correction_ = np.linalg.solve(C.T @ C + reg, C.T @ target)
        self.fitted_ = True
        return self

    @staticmethod
    def _context(
        matrices: Sequence[np.ndarray], per_kernel: Sequence[np.ndarray], base: np.ndarray
    ) -> np.ndarray:
        """Per-model rows of :data:`MODEL_CONTEXT`, from each model's :func:`feature_matrix`."""
        rows = []
        for X, pk, b in zip(matrices, per_kernel, base, strict=True):
            log_b = np.log(max(b, 1e-6))
            if not len(X):
                rows.append([1.0, log_b, log_b**2, 0.0, 0.0, 0.0])
                continue
            int8 = pk[X[:, _INT8_IN] > 0].sum() / max(pk.sum(), 1e-12)
            rows.append([1.0, log_b, log_b**2, X[0, -3], X[0, -2], int8])
        return np.asarray(rows).reshape(-1, len(MODEL_CONTEXT))

    def _fit_type(self, X: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, Forest | None]:
        """log(time per unit of work): its median, and boosted trees when there is data."""
        rate = np.log(t) - np.log(kernel_work(X))
        base = np.asarray([float(np.median(rate))])
        if len(t) < 2 * self.min_samples // 3:
            return base, None
        # A profile column that never varies here carries nothing, and left out it cannot move
        # the trees (scikit-learn visits every column in a random order, constant ones too).
        varies = np.ptp(X[:, len(FEATURE_NAMES) : _KERNEL_COLUMNS], axis=0) > 0
        columns = len(FEATURE_NAMES) + (np.flatnonzero(varies).max(initial=-1) + 1)
        forest = Forest.fit(
            X[:, :columns],
            rate,
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            learning_rate=self.learning_rate,
            random_state=self.random_state,
        )
        return base, forest

    def predict_kernels(self, kernels: Sequence[Kernel], corrected: bool = True) -> np.ndarray:
        """Predicted time (ms) of each kernel of *one model* (``corrected=False``: before any
        transfer)."""
        return self._kernel_times(kernels, self.matrix(kernels), corrected)

    def matrix(self, kernels: Sequence[Kernel]) -> np.ndarray:
        """:func:`feature_matrix` of one model's kernels on this predictor's profile."""
        return feature_matrix(list(kernels), self.threads)

    def _kernel_times(
        self, kernels: Sequence[Kernel], X: np.ndarray, corrected: bool = True
    ) -> np.ndarray:
        """:meth:`predict_kernels`, given the model's :func:`feature_matrix` ``X``."""
        if not kernels:
            return np.zeros(0)
        keys = [regressor_key(k) for k in kernels]
        keys = np.asarray([k if k in self.models_ else FALLBACK for k in keys])
        out = np.zeros(len(kernels))
        log_work = np.log(kernel_work(X))
        for key in np.unique(keys):
            rows = keys == key
            base, forest = self.models_[str(key)]
            rate = forest.predict(X[rows, :_KERNEL_COLUMNS]) if forest is not None else base[0]
            log_t = log_work[rows] + rate
            corr = self.correction_.get(str(key), self.correction_.get(FALLBACK))
            if corrected and corr is not None:
                log_t = log_t + corr[0] + corr[1] * log_t
            out[rows] = np.exp(log_t)
        return out

    def predict(self, models: Sequence[Sequence[Kernel]]) -> np.ndarray:
        """Predicted latency (ms) of each model given as its kernel list."""
        matrices = [self.matrix(ks) for ks in models]
        per_kernel = [self._kernel_times(ks, X) for ks, X in zip(models, matrices, strict=True)]
        return self._per_model(matrices, per_kernel)

    def predict_from_kernel_times(
        self, models: Sequence[Sequence[Kernel]], per_kernel: Sequence[np.ndarray]
    ) -> np.ndarray:
        """Latency (ms) of each model from its kernels' times (ms, in kernel order): the
        per-model part alone. Fed micro-benchmarked times, it tells how much of a prediction's
        error is the kernels' and how much the model's (experiments/latency_predictors.py)."""
        matrices = [self.matrix(ks) for ks in models]
        return self._per_model(matrices, [np.asarray(pk, dtype=np.float64) for pk in per_kernel])

    def _per_model(
        self, matrices: Sequence[np.ndarray], per_kernel: Sequence[np.ndarray]
    ) -> np.ndarray:
        """Model latencies from each model's feature matrix and kernel times."""
        base = overhead_inputs(matrices, [pk.sum() for pk in per_kernel]) @ self.overhead_
        context = self._context(matrices, per_kernel, base)
        return base * np.exp(context @ self.model_correction_)

    def predict_onnx(self, model: OnnxModel, input_shape: tuple[int, ...]) -> float:
        """Predicted latency (ms) of an ONNX model on an ``input_shape`` input."""
        return float(self.predict([extract_kernels(model, input_shape)])[0])

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"overhead": self.overhead_, "model_correction": self.model_correction_}
        types = []
        for i, (key, (coef, forest)) in enumerate(self.models_.items()):
            types.append({"key": key, "forest": forest is not None})
            arrays[f"t{i}_coef"] = coef
            if forest is not None:
                arrays.update(forest.arrays(f"t{i}_"))
        corrections = sorted(self.correction_)
        for i, key in enumerate(corrections):
            arrays[f"c{i}_correction"] = self.correction_[key]
        state = {"types": types, "keys": self.keys_, "correction": corrections}
        return state, arrays

    def _set_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.keys_ = list(state["keys"])
        self.models_ = {}
        for i, entry in enumerate(state["types"]):
            forest = Forest.from_arrays(arrays, f"t{i}_") if entry["forest"] else None
            if forest is not None and forest.feature.max(initial=0) >= _KERNEL_COLUMNS:
                raise ValueError(f"trees of {entry['key']!r} read a column that does not exist")
            coef = np.asarray(arrays[f"t{i}_coef"], dtype=np.float64)
            if coef.shape != (1,):
                raise ValueError(f"base rate of {entry['key']!r} has shape {coef.shape}")
            self.models_[str(entry["key"])] = (coef, forest)
        if FALLBACK not in self.models_:
            raise ValueError("no fallback regressor")
        self.correction_ = {
            str(key): arrays[f"c{i}_correction"] for i, key in enumerate(state["correction"])
        }
        self.overhead_ = np.asarray(arrays["overhead"], dtype=np.float64)
        self.model_correction_ = np.asarray(arrays["model_correction"], dtype=np.float64)
        shapes = (self.overhead_.shape, self.model_correction_.shape)
        if shapes != ((len(OVERHEAD_INPUTS),), (len(MODEL_CONTEXT),)):
            raise ValueError("per-model overhead arrays have the wrong shape")


def timed_kernels(
    models: Sequence[Sequence[Kernel]],
    y: np.ndarray,
    kernel_times: Sequence[Mapping[str, float]],
    normalize: bool,
) -> list[dict[str, float]]:
    """Each model's positive node times of its kernels, optionally made to sum to ``y``.

    Normalising first removes the profiler's own cost per node (the median over the models of
    (sum of node times - latency) / nodes, about 2 µs here), then scales what is left to the
    timed latency; models whose profile is off by more than 2x are left out (empty dict).
    """
    out = [
        {k.name: float(nt[k.name]) for k in ks if nt.get(k.name, 0) > 0}
        for ks, nt in zip(models, kernel_times, strict=True)
    ]
    if not normalize:
        return out
    excess = [(sum(t.values()) - total) / len(t) for t, total in zip(out, y, strict=True) if t]
    per_node = max(0.0, float(np.median(excess))) if excess else 0.0
    for i, (times, total) in enumerate(zip(out, y, strict=True)):
        if not times:
            continue
        times = {n: max(t - per_node, 0.25 * t) for n, t in times.items()}
        scale = total / sum(times.values())
        out[i] = {n: t * scale for n, t in times.items()} if 0.5 <= scale <= 2 else {}
    return out


def overhead_inputs(matrices: Sequence[np.ndarray], sums: Sequence[float]) -> np.ndarray:
    """Per-model rows of :data:`OVERHEAD_INPUTS`, from each model's :func:`feature_matrix` and
    sum of kernel times (ms)."""
    rows = []
    for X, total in zip(matrices, sums, strict=True):
        weights = float(X[:, _WEIGHT_BYTES].sum()) / 1e6
        activations = float(X[:, _IN_BYTES].sum() + X[:, _OUT_BYTES].sum()) / 1e6
        rows.append([float(total), float(len(X)), weights, activations, 1.0])
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(OVERHEAD_INPUTS))


def _fit_overhead(
    A: np.ndarray, y: np.ndarray, prior: np.ndarray | None = None, shrinkage: float = 0.0
) -> np.ndarray:
    """``y ≈ A @ coef`` (rows of :func:`overhead_inputs`) in relative least squares, refitted
    once without the models it misses by more than 3 median deviations (noisy measurements).

    With a ``prior`` (transfer from few models), each coefficient's relative change from it
    costs ``shrinkage`` models' worth of relative error: the data move what they determine.
    """
    A = A / y[:, None]
    k = A.shape[1]
    if prior is None:
        P, target = np.zeros((0, k)), np.zeros(0)
    else:
        scale = np.maximum(np.abs(prior), 1e-9)
        P, target = np.diag(np.sqrt(shrinkage) / scale), np.sqrt(shrinkage) * prior / scale

    def solve(rows: np.ndarray) -> np.ndarray:
        design = np.vstack([A[rows], P])
        coef, *_ = np.linalg.lstsq(design, np.r_[np.ones(rows.sum()), target], rcond=None)
        return coef

    coef = solve(np.ones(len(y), dtype=bool))
    err = np.abs(A @ coef - 1)
    keep = err <= 3 * max(float(np.median(err)), 1e-3)
    return solve(keep) if keep.sum() >= k or prior is not None else coef


class ArchPredictor(_Predictor):
    """Boosted trees over architecture encodings (e.g. ``SearchSpace.encode``), log-latency.

    Many shallow trees by default: latency is close to a sum of per-block terms, which depth-2
    trees capture best from a few hundred samples (3-fold CV on mbv3: 46% vs 36% within ±10%
    for depth 6).
    """

    kind = "arch"

    def __init__(
        self,
        n_estimators: int = 1500,
        max_depth: int = 2,
        learning_rate: float = 0.1,
        random_state: int = 0,
        device: DeviceInfo | None = None,
    ):
        super().__init__(device)
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.random_state = random_state

    def _params(self) -> dict[str, Any]:
        return {
            "n_estimators": self.n_estimators,
            "max_depth": self.max_depth,
            "learning_rate": self.learning_rate,
            "random_state": self.random_state,
        }

    def fit(
        self, X: np.ndarray, y: Sequence[float], feature_names: Sequence[str] | None = None
    ) -> ArchPredictor:
        X, y = _check_xy(X, y)
        self.forest_ = Forest.fit(
            X,
            np.log(y),
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            learning_rate=self.learning_rate,
            random_state=self.random_state,
        )
        self.n_features_in_ = X.shape[1]
        self.feature_names_ = list(feature_names or [f"x{i}" for i in range(X.shape[1])])
        self.fitted_ = True
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = _check_x(X, self.n_features_in_)
        return np.exp(self.forest_.predict(X))

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"n_features_in": self.n_features_in_}, self.forest_.arrays("")

    def _set_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.n_features_in_ = int(state["n_features_in"])
        self.forest_ = Forest.from_arrays(arrays, "")


class LutPredictor(_Predictor):
    """Additive lookup table: latency = bias + sum over columns of table[column][value].

    Each column's values are binned (its distinct values if at most ``max_levels``, quantile
    bins otherwise); the table is fitted by ridge least squares in milliseconds, so entries read
    as per-block latencies. Interactions between columns are not modelled.
    """

    kind = "lut"

    def __init__(self, max_levels: int = 16, alpha: float = 1e-3, device: DeviceInfo | None = None):
        super().__init__(device)
        self.max_levels = max_levels
        self.alpha = alpha

    def _params(self) -> dict[str, Any]:
        return {"max_levels": self.max_levels, "alpha": self.alpha}

    def fit(
        self, X: np.ndarray, y: Sequence[float], feature_names: Sequence[str] | None = None
    ) -> LutPredictor:
        X, y = _check_xy(X, y)
        edges = []
        for j in range(X.shape[1]):
            levels = np.unique(X[:, j])
            if len(levels) > self.max_levels:
                levels = np.unique(np.quantile(X[:, j], np.linspace(0, 1, self.max_levels)))
            mids = (levels[1:] + levels[:-1]) / 2  # bin b: mids[b-1] < x <= mids[b]
            edges.append(mids)
        self.edges_ = edges
        self.offsets_ = np.cumsum([0] + [len(e) + 1 for e in edges])
        A = self._design(X)
        mean = y.mean()
        reg = self.alpha * len(y) * np.eye(A.shape[1])
        self.table_ = np.linalg.solve(A.T @ A + reg, A.T @ (y - mean))
        self.bias_ = float(mean)
        self.n_features_in_ = X.shape[1]
        self.feature_names_ = list(feature_names or [f"x{i}" for i in range(X.shape[1])])
        self.fitted_ = True
        return self

    def _bins(self, X: np.ndarray) -> np.ndarray:
        return np.stack(
            [
                np.searchsorted(e, X[:, j], side="left") + self.offsets_[j]
                for j, e in enumerate(self.edges_)
            ],
            axis=1,
        )

    def _design(self, X: np.ndarray) -> np.ndarray:
        A = np.zeros((X.shape[0], int(self.offsets_[-1])))
        np.put_along_axis(A, self._bins(X), 1.0, axis=1)
        return A

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = _check_x(X, self.n_features_in_)
        return self.bias_ + self.table_[self._bins(X)].sum(axis=1)

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"table": self.table_, "offsets": self.offsets_}
        arrays.update({f"edges_{j}": e for j, e in enumerate(self.edges_)})
        return {"bias": self.bias_, "n_features_in": len(self.edges_)}, arrays

    def _set_state(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.n_features_in_ = int(state["n_features_in"])
        self.edges_ = [arrays[f"edges_{j}"] for j in range(self.n_features_in_)]
        self.offsets_ = arrays["offsets"].astype(np.int64)
        self.table_ = arrays["table"]
        self.bias_ = float(state["bias"])
        if self.table_.shape != (int(self.offsets_[-1]),):
            raise ValueError("table size does not match its bins")


def _check_xy(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[0] < 2:
        raise AutocompError(
            f"fit needs X of shape (n, d) and y of shape (n,), got {X.shape}, {y.shape}"
        )
    if not np.all(y > 0):
        raise AutocompError("latencies must be positive")
    return X, y


def _check_x(X: Any, n_features: int) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != n_features:
        raise AutocompError(f"expected encodings with {n_features} columns, got shape {X.shape}")
    return X
