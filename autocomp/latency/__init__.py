"""Latency predictors fitted from on-device measurements.

``load_predictor(device=get_device("cpu"))`` returns the kernel-level predictor for that device's
profile (shipped, cached, or adapted from ≤ 30 measurements); ``KernelPredictor`` predicts any
ONNX model from the kernels ONNX Runtime executes; ``ArchPredictor`` and ``LutPredictor`` predict
search-space encodings at ≥ 10^4 candidates/s.
"""

from autocomp.latency.metrics import latency_metrics
from autocomp.latency.predictors import ArchPredictor, KernelPredictor, LutPredictor, load
from autocomp.latency.store import load_predictor

__all__ = [
    "ArchPredictor",
    "KernelPredictor",
    "LutPredictor",
    "latency_metrics",
    "load",
    "load_predictor",
]
