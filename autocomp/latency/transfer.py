"""Few-shot transfer of a kernel predictor to a new device profile (as LitePred / HELP do).

The shipped predictor is the prior; a handful (≤ 30) of generated models measured on the new
profile fit a correction in log-latency space, per kernel type:
``log t_new = log t_prior + a_type + b_type * log t_prior`` (``b`` lets big kernels speed up more
than small ones with more threads). Each type's line is shrunk toward the line fitted on all
kernels, so types seen a few times only borrow strength from the rest. Without profiled node
times (a device that cannot profile), one scale factor on whole-model latencies is fitted instead.

When the new profile differs from the prior's only in what the kernel features carry (the batch,
and the intra-op thread count, a profile column of :func:`~autocomp.latency.kernels.feature_matrix`)
and the prior's own measurements are at hand (the shipped predictor ships them), the predictor is
instead refitted on both sets pooled: the kernel regressors then learn the batch's or the threads'
effect from the new kernels, within the shapes the prior's data span. A per-type line corrects
such a size-dependent effect only in part: to 2 threads, from the same 30 measurements, pooling
put 70.0% of 30 held-out models within ±10% (MAPE 8.3%) and the correction 50.0% (MAPE 10.7%)
(experiments/latency_predictors.py, 2026-11-25). Across other CPUs or runtimes the same kernel
features would mean two different times, so those are corrected as above.

Either way the per-model part (overhead and context correction: how a profile's kernels add up
to a model) is then refitted on the new measurements, each coefficient pulled toward the one it
replaces: a pooled fit's per-model part is otherwise the prior's models' (hundreds against 30).
On a host too noisy to tell much (experiments/latency_predictors.py, 2026-12-05, where two
halves of the sessions of one model agreed within ±10% for only 67.5-90.0% of the held-out models),
the refit moved 2 threads from 70.0% to 73.3% within ±10% and left batch 4 where it was.

Thirty models can also mislead a refit: where the predictor already fits the new profile, the
refit fits the measurements' noise. So it is kept only if it predicts the measured models better
than the predictor it would replace under cross-validation
(:func:`~autocomp.latency.metrics.out_of_fold`); otherwise that one serves the new profile as it
is. The check only sees the measured models: at batch 4 on an earlier host the correction
(before pooling) cross-validated better (mean |log error| 0.036 against the prior's 0.042) and was
kept, yet put fewer held-out models within ±10% than the prior as is (80.0% against 83.3%).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from autocomp.latency.dataset import kernel_inputs, profiled
from autocomp.latency.metrics import out_of_fold
from autocomp.latency.predictors import (
    FALLBACK,
    KernelPredictor,
    _fit_overhead,
    overhead_inputs,
    regressor_key,
    timed_kernels,
)

if TYPE_CHECKING:
    from autocomp.hardware.base import DeviceInfo

#: Strength (in kernels) of the pull of a kernel type's correction toward the global one.
SHRINKAGE = 20.0
#: Pull (in models) of the refitted per-model correction toward the prior's.
MODEL_SHRINKAGE = 10.0
#: Pull (in models) of each refitted overhead coefficient toward the prior's (relative change).
OVERHEAD_SHRINKAGE = 1.0


def _weighted_line(
    x: np.ndarray, r: np.ndarray, w: np.ndarray, prior: np.ndarray, lam: float
) -> np.ndarray:
    """(a, b) minimising sum w (r - a - b x)^2 + lam * mean(w) * |(a, b) - prior|^2."""
    A = np.stack([np.ones_like(x), x], axis=1)
    reg = lam * float(w.mean()) * np.eye(2)
    lhs = A.T @ (A * w[:, None]) + reg
    rhs = A.T @ (w * r) + reg @ prior
    return np.linalg.solve(lhs, rhs)


def adapt(
    prior: KernelPredictor,
    records: Sequence[dict[str, Any]],
    prior_records: Sequence[dict[str, Any]] = (),
) -> KernelPredictor:
    """A predictor for the device profile of ``records`` (≤ 30 suffice): refitted on them pooled
    with ``prior_records`` (the prior's own measurements) where only the batch and threads differ,
    else a copy of ``prior`` corrected; then its per-model part refitted on ``records`` where
    that cross-validates better than leaving it (module docstring)."""
    from autocomp.hardware.base import DeviceInfo

    device = DeviceInfo.from_dict(records[0]["device"])
    if prior_records and _poolable(prior, device, records, prior_records):
        pooled = pooled_fit(prior, records, prior_records)
        return _if_it_validates(pooled, lambda chosen: _refit_model_part(pooled, chosen), records)
    as_is = copy.deepcopy(prior)
    as_is.device = device
    return _if_it_validates(as_is, lambda chosen: _corrected(prior, chosen), records)


def pooled_fit(
    prior: KernelPredictor,
    records: Sequence[dict[str, Any]],
    prior_records: Sequence[dict[str, Any]],
) -> KernelPredictor:
    """A predictor of ``prior``'s hyper-parameters for the profile of ``records``, fitted on them
    and ``prior_records`` together (each kernel row carrying its model's thread count)."""
    from autocomp.hardware.base import DeviceInfo

    pool = [*prior_records, *records]
    pooled = KernelPredictor(**prior._params(), device=DeviceInfo.from_dict(records[0]["device"]))
    return pooled.fit(*kernel_inputs(pool), threads=[_threads(r) for r in pool])


def _if_it_validates(
    kept: KernelPredictor,
    refit: Callable[[Sequence[dict[str, Any]]], KernelPredictor],
    records: Sequence[dict[str, Any]],
) -> KernelPredictor:
    """``refit(records)`` if, refitted without each record, it predicts that record better than
    ``kept`` does (:func:`~autocomp.latency.metrics.out_of_fold`), else ``kept``."""
    if len(records) < 2:
        return refit(records)
    models, y, _ = kernel_inputs(records)
    held_out = out_of_fold(
        len(records),
        lambda fit, rest: refit([records[i] for i in fit]).predict([models[i] for i in rest]),
    )
    return refit(records) if _log_error(held_out, y) < _log_error(kept.predict(models), y) else kept


def _poolable(
    prior: KernelPredictor,
    device: DeviceInfo,
    records: Sequence[dict[str, Any]],
    prior_records: Sequence[dict[str, Any]],
) -> bool:
    """Whether ``records`` differ from the prior's measurements only in what the kernel features
    carry (batch, threads), timed alike (micro-benchmarks or profiles)."""
    if prior.device is None:
        return False
    same = replace(device, batch=prior.device.batch, threads=prior.device.threads)
    return same.profile == prior.device.profile and profiled(records) == profiled(prior_records)


def _threads(record: dict[str, Any]) -> int:
    """Intra-op threads a dataset record was measured with."""
    return int(record["device"]["threads"])


def _log_error(predicted: np.ndarray, y: np.ndarray) -> float:
    """Mean |log(predicted / measured)|."""
    return float(np.mean(np.abs(np.log(predicted / y))))


def _corrected(prior: KernelPredictor, records: Sequence[dict[str, Any]]) -> KernelPredictor:
    """A copy of ``prior`` corrected to the device profile of ``records``."""
    from autocomp.hardware.base import DeviceInfo

    models, y, raw_times = kernel_inputs(records)
    times = timed_kernels(models, y, raw_times, profiled(records))
    adapted = copy.deepcopy(prior)
    adapted.correction_ = {}
    adapted.device = DeviceInfo.from_dict(records[0]["device"])
    # What the prior's regressors say on the new profile is what the correction corrects.
    matrices = [adapted.matrix(ks) for ks in models]
    kernels = [k for ks, nt in zip(models, times, strict=True) for k in ks if k.name in nt]
    if not kernels:  # no profile: one scale factor on whole-model latency
        scale = float(np.median(np.log(y / prior.predict(models))))
        adapted.correction_ = {key: np.asarray([scale, 0.0]) for key in adapted.models_}
        return adapted
    measured = np.asarray(
        [nt[k.name] for ks, nt in zip(models, times, strict=True) for k in ks if k.name in nt]
    )
    base = np.concatenate(
        [
            prior._kernel_times(ks, X, corrected=False)[[k.name in nt for k in ks]]
            for ks, nt, X in zip(models, times, matrices, strict=True)
        ]
    )
    x, r = np.log(base), np.log(measured) - np.log(base)
    keys = np.asarray(
        [key if key in prior.models_ else FALLBACK for key in map(regressor_key, kernels)]
    )
    w = base / base.sum()  # the correction should be right where the time goes
    glob = _weighted_line(x, r, w, np.zeros(2), 1e-3)
    adapted.correction_[FALLBACK] = glob
    for key in adapted.models_:
        rows = keys == key
        if rows.any():
            adapted.correction_[key] = _weighted_line(x[rows], r[rows], w[rows], glob, SHRINKAGE)
    return _refit_model_part(adapted, records)


def _refit_model_part(
    predictor: KernelPredictor, records: Sequence[dict[str, Any]]
) -> KernelPredictor:
    """A copy of ``predictor`` whose per-model overhead and correction are refitted on
    ``records``, each pulled toward ``predictor``'s own (:data:`OVERHEAD_SHRINKAGE`,
    :data:`MODEL_SHRINKAGE`): how a profile's kernels add up to a model is the profile's own."""
    adapted = copy.deepcopy(predictor)
    models, y, raw_times = kernel_inputs(records)
    times = timed_kernels(models, y, raw_times, profiled(records))
    matrices = [adapted.matrix(ks) for ks in models]
    kept = np.asarray([bool(nt) for nt in times])
    measured = overhead_inputs(matrices, [sum(nt.values()) for nt in times])
    if kept.any():  # models with timed kernels
        adapted.overhead_ = _fit_overhead(
            measured[kept], y[kept], prior=predictor.overhead_, shrinkage=OVERHEAD_SHRINKAGE
        )
    per_kernel = [adapted._kernel_times(ks, X) for ks, X in zip(models, matrices, strict=True)]
    base = overhead_inputs(matrices, [p.sum() for p in per_kernel]) @ adapted.overhead_
    C = adapted._context(matrices, per_kernel, base)
    reg = MODEL_SHRINKAGE * np.eye(C.shape[1])
    adapted.model_correction_ = np.linalg.solve(
        C.T @ C + reg, C.T @ (np.log(y) - np.log(base)) + reg @ predictor.model_correction_
    )
    return adapted
