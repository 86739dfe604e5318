"""Where predictors live, and the one way to get one: :func:`load_predictor`.

Kernel predictors are kept per device profile: shipped ones in the package
(``latency_predictors/<profile>/kernel.npz``, with the measurements they were fitted on and a
provenance file) and adapted ones in the user cache (``$AUTOCOMP_CACHE`` or
``~/.cache/autocomp``, under ``predictors/<profile>/``). A predictor is only ever returned for the
profile asked for: when none exists and a device is at hand, one is adapted from the shipped
default with ≤ 30 measurements on that device and cached; otherwise it is an error.
"""

from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources
from pathlib import Path

from autocomp.cache import cache_root
from autocomp.errors import AutocompError
from autocomp.hardware.base import Device, DeviceInfo
from autocomp.latency.predictors import KernelPredictor, OutdatedPredictorError, _Predictor, load

PREDICTOR_FILE = "kernel.npz"
DATA_FILE = "measurements.jsonl"
#: Generated models measured to adapt a predictor to a new profile (a seed unused for fitting).
TRANSFER_SAMPLES = 30
TRANSFER_SEED = 1000


def cache_dir() -> Path:
    """User cache of adapted predictors: :func:`~autocomp.cache.cache_root`/predictors."""
    return cache_root() / "predictors"


def builtin_dir() -> Path:
    """The shipped ``latency_predictors/`` folder (package ``autocomp.builtin_predictors``)."""
    return Path(str(resources.files("autocomp.builtin_predictors")))


def builtin_profiles() -> list[str]:
    """Profiles with a shipped predictor."""
    root = builtin_dir()
    return sorted(p.parent.name for p in root.glob(f"*/{PREDICTOR_FILE}"))


def default_predictor_path(device_info: DeviceInfo | None = None) -> Path:
    """The shipped predictor used as the prior for transfer (ORT CPU, 1 thread, batch 1): the one
    of ``device_info``'s processor and runtime where one is shipped, since transfer can then pool
    its measurements (:mod:`~autocomp.latency.transfer`), else the one whose own data
    cross-validate best (``provenance.json``): its kernel shapes are the least blurred by its
    host's noise, and across CPUs only the shapes carry over."""
    profiles = [p for p in builtin_profiles() if p.endswith("_t1_b1")] or builtin_profiles()
    if not profiles:
        raise AutocompError("this autocomp installation ships no latency predictor")
    same_host = replace(device_info, threads=1, batch=1).profile if device_info else None
    profiles.sort(key=lambda p: (p != same_host, -_cross_validated_within_10(p)))
    return builtin_dir() / profiles[0] / PREDICTOR_FILE


def _cross_validated_within_10(profile: str) -> float:
    """% within ±10% of a shipped predictor cross-validated on its own data; 0 when unknown."""
    try:
        provenance = json.loads((builtin_dir() / profile / "provenance.json").read_text())
        return float(provenance["cross_validated_5_fold"]["within_10_pct"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def find_predictor(profile: str) -> Path | None:
    """The shipped or cached predictor file for ``profile``, if any. Shipped first: it is fitted
    from hundreds of measurements, a cached one adapted from 30, and a profile adapted before
    this autocomp shipped its own predictor must not keep the adaptation."""
    for root in (builtin_dir(), cache_dir()):
        path = root / profile / PREDICTOR_FILE
        if path.is_file():
            return path
    return None


def load_predictor(
    path_or_profile: str | Path | None = None,
    *,
    device_info: DeviceInfo | None = None,
    device: Device | None = None,
    batch: int = 1,
    progress: bool = True,
) -> _Predictor:
    """The predictor for a file or a profile, checked against the device it will serve.

    ``path_or_profile``: a predictor file, a profile key, or None for the profile of
    ``device``/``device_info``. With ``device`` (a :class:`Device`) a missing profile is
    adapted from the shipped default by measuring ``TRANSFER_SAMPLES`` generated models of batch
    ``batch`` and cached; a predictor of another profile is never returned.
    """
    if device is not None:
        device_info = device.info.with_batch(batch)
    if path_or_profile is not None and Path(path_or_profile).suffix == ".npz":
        return load(path_or_profile, device_info)
    profile = str(path_or_profile) if path_or_profile is not None else None
    if profile is None:
        if device_info is None:
            return load(default_predictor_path())
        profile = device_info.profile
    if device_info is not None and device_info.profile != profile:
        raise AutocompError(
            f"asked for profile {profile} but the device is profile {device_info.profile}"
        )
    path = find_predictor(profile)
    if path is not None:
        try:
            return load(path, device_info)
        except OutdatedPredictorError:
            if device is None or path.parent.parent != cache_dir():
                raise
            # Adapted by an earlier autocomp: readapt from its cached measurements.
    if device is None:
        known = ", ".join(builtin_profiles()) or "none"
        raise AutocompError(
            f"no latency predictor for device profile {profile} (shipped: {known}); pass the "
            f"device to adapt one from {TRANSFER_SAMPLES} measurements"
        )
    return adapt_to_device(device, batch=batch, progress=progress)


def adapt_to_device(
    device: Device,
    *,
    batch: int = 1,
    samples: int | None = None,
    prior: KernelPredictor | None = None,
    progress: bool = True,
) -> KernelPredictor:
    """Measure ``samples`` (default :data:`TRANSFER_SAMPLES`) generated models on ``device``,
    adapt the prior (the shipped default unless ``prior`` is given; only the shipped one comes
    with the measurements that :func:`~autocomp.latency.transfer.adapt` may pool), cache the
    result."""
    from autocomp.latency.dataset import measure_generated, read_records
    from autocomp.latency.transfer import adapt

    shipped = default_predictor_path(device.info)
    # The shipped predictor ships the measurements it was fitted from: transfer may pool them.
    fitted_on = shipped.parent / DATA_FILE
    prior_records = read_records(fitted_on) if prior is None and fitted_on.is_file() else []
    prior = prior or load(shipped)
    if not isinstance(prior, KernelPredictor):
        raise AutocompError("transfer needs a kernel predictor as the prior")
    profile = device.info.with_batch(batch).profile
    folder = cache_dir() / profile
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / DATA_FILE
    samples = samples or TRANSFER_SAMPLES
    measure_generated(device, samples, data, seed=TRANSFER_SEED, batch=batch, progress=progress)
    adapted = adapt(prior, read_records(data)[:samples], prior_records)
    adapted.save(folder / PREDICTOR_FILE)
    return adapted
