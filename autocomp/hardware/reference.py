"""Reference timing: a model's latency at the host's calibrated speed, for shared hosts.

On a shared VM the whole host changes speed, for seconds or for minutes (``experiments/
host_drift.py``: four models' 4-second window medians moved together, correlation 0.98-1.0,
while each ranged over 1.4-1.6x its fastest), so a process that falls into a slow stretch reports
a slow median and no estimator inside it can tell. Timing a fixed reference model in alternation
with the model (blocks of a few runs each) measures that speed at the same moments:
each block of the model is scaled by the host's calibrated reference time over the reference's
neighbouring block. The result is the model's latency had the host run at the speed it had when
the reference was calibrated (:func:`nominal_ms`: cached per device profile under
``$AUTOCOMP_CACHE/reference``; delete the file to recalibrate).

Measured by ``experiments/measure_repeatability.py --reference`` (2026-12-07, AMD EPYC family
25): across 5 processes per timm model the largest deviation from their median was 2.9-5.1%
with reference timing against 3.5-29.2% without, in the same rounds. The reference cannot see
everything: a neighbour that slows memory more than arithmetic slows a memory-bound model more
than the reference.

It needs the thread clock (one intra-op thread on the CPU): with wall time the reference's
blocks would also absorb time given to other processes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from autocomp.cache import cache_root
from autocomp.errors import AutocompError
from autocomp.hardware.timing import DEFAULT_TIMING, REFERENCE_BLOCK

#: The reference's input shape.
REFERENCE_SHAPE = (1, 3, 128, 128)
#: How the reference is calibrated, whatever timing the device that needs it uses.
CALIBRATION_TIMING = DEFAULT_TIMING


def reference_model() -> onnx.ModelProto:
    """A small CNN (3x3, depthwise and pointwise convolutions, pooling, a classifier) with fixed
    weights: 62 M MACs, 0.2 MB of weights, the same bytes on every host; its activations (up to
    1.5 MB) leave the core's caches, as most models' do."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def weight(name: str, *shape: int) -> str:
        fan_in = int(np.prod(shape[1:]))
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name
            )
        )
        return name

    def conv(x: str, name: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        w = weight(f"{name}.w", cout, cin // groups, k, k)
        b = weight(f"{name}.b", cout)
        nodes.append(
            helper.make_node(
                "Conv",
                [x, w, b],
                [f"{name}.y"],
                kernel_shape=[k, k],
                strides=[stride] * 2,
                pads=[k // 2] * 4,
                group=groups,
            )
        )
        nodes.append(helper.make_node("Relu", [f"{name}.y"], [f"{name}.a"]))
        return f"{name}.a"

    x = conv("input", "stem", 3, 32, 3, stride=2)
    x = conv(x, "dw", 32, 32, 3, groups=32)
    x = conv(x, "expand", 32, 96, 1)
    x = conv(x, "dw2", 96, 96, 3, stride=2, groups=96)
    x = conv(x, "project", 96, 64, 1)
    x = conv(x, "body", 64, 64, 3)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    nodes.append(
        helper.make_node(
            "Gemm", ["flat", weight("fc.w", 10, 64), weight("fc.b", 10)], ["output"], transB=1
        )
    )
    graph = helper.make_graph(
        nodes,
        "autocomp_reference",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(REFERENCE_SHAPE))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def calibration_path(profile: str) -> Path:
    return cache_root() / "reference" / f"{profile}.json"


def nominal_ms(profile: str, reference: bytes, calibrate: Callable[[], float]) -> float:
    """The reference's calibrated time on this profile: cached, or ``calibrate()`` now (and
    cached) when there is none for these reference bytes."""
    path = calibration_path(profile)
    digest = hashlib.sha256(reference).hexdigest()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data["reference_sha256"] == digest and float(data["nominal_ms"]) > 0:
                return float(data["nominal_ms"])
        except (ValueError, KeyError, TypeError) as err:
            raise AutocompError(
                f"unreadable reference calibration {path} ({type(err).__name__}); delete it to "
                "recalibrate"
            ) from None
    value = calibrate()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(
        json.dumps(
            {
                "profile": profile,
                "reference_sha256": digest,
                "nominal_ms": value,
                "calibrated_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            },
            indent=2,
        )
    )
    partial.replace(path)
    return value


def scaled(samples: list[float], reference: list[float], nominal: float) -> list[float]:
    """The model's samples (blocks of :data:`REFERENCE_BLOCK`, alternating with the reference's),
    each block scaled by ``nominal`` over the fastest run of the reference block after it (the
    warmest: the model's runs evict the reference's data, which its calibration runs did not)."""
    out = []
    for i in range(0, len(samples), REFERENCE_BLOCK):
        ref = min(reference[i : i + REFERENCE_BLOCK])
        out.extend(t * nominal / ref for t in samples[i : i + REFERENCE_BLOCK])
    return out
