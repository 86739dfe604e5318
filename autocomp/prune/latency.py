"""Latency of pruning/bits policies on the device: measured, or kernel-predicted and calibrated.

A policy is deployed as its pruned network exported with its per-layer bits (QDQ int8), so its
latency is that ONNX graph's. Two ways to know it:

``measure`` (the default): export and time every policy the search screens on the device, with a
short timing (the final model is timed again in full). On this machine exporting and timing a
small network takes about as long as extracting its kernels for the predictor, so measuring is
the truth and no slower.

``predict``: the device's kernel-level predictor on the pruned ONNX graph, calibrated per run: the
original model, the smallest policy and a few random ones are measured and the predictor is
scaled by the median measured/predicted ratio. Useful where measuring is slow (a remote agent).

Either way the estimate is the screening one. The policies a choice relies on are timed again as
verification times them (:meth:`PolicyLatency.verify`: full timing; one session's short timing read
resnet18 in int8 at 0.190 ms that verification measured at 0.209 ms), and a verification that
comes out slower than expected raises a safety factor (:meth:`PolicyLatency.correct`), so the next
choice is made with the truth in hand.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from autocomp.errors import AutocompError
from autocomp.hardware.base import Device
from autocomp.spaces.candidate import Candidate

MODES = ("measure", "predict")


class PolicyLatency:
    """Latency of the policies of ``space`` on ``device`` (see the module docstring).

    ``probe`` is a small batch of training images that calibrates the int8 layers of exported
    policies (latency does not depend on the calibrated values). ``predictor`` is the device's
    kernel predictor (``predict`` mode only). ``verifier`` is the device with the timing of a
    verification (default: ``device``).
    """

    def __init__(
        self,
        space: Any,
        device: Device,
        probe: Tensor,
        *,
        mode: str = "measure",
        predictor: Any = None,
        verifier: Device | None = None,
    ) -> None:
        if mode not in MODES:
            raise AutocompError(f"unknown latency mode {mode!r}; use one of {', '.join(MODES)}")
        if mode == "predict" and predictor is None:
            raise AutocompError("latency mode 'predict' needs the device's kernel predictor")
        self.space = space
        self.device = device
        self.probe = probe
        self.mode = mode
        self.predictor = predictor
        self.verifier = verifier or device
        self.scale_ = 1.0
        self.measured_: dict[str, float] = {}
        self.kernel_: dict[str, float] = {}
        self.verified_: dict[str, float] = {}
        self.calibration_: list[dict[str, float]] = []
        self.corrections_: list[dict[str, float]] = []
        self._log: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        r = self.space.resolution
        return (1, self.space.in_channels, r, r)

    def onnx(self, candidate: Candidate) -> bytes:
        """The candidate as deployed: pruned network, its int8 layers as QDQ."""
        from autocomp.prune.deploy import export_policy

        net = self.space.build(candidate)
        with tempfile.TemporaryDirectory(prefix="autocomp-policy-") as tmp:
            path, probe = Path(tmp) / "m.onnx", [self.probe]
            info = export_policy(net, candidate.bits, self.shape, path, calibration_batches=probe)
            return info.path.read_bytes()

    # ------------------------------------------------------------------------------ truth
    def measure(self, candidate: Candidate) -> float:
        """Median latency (ms) of the deployed candidate on the device (cached per policy)."""
        return self._timed(candidate, self.device, self.measured_, "measured")

    def verify(self, candidate: Candidate) -> float:
        """Median latency (ms) of the deployed candidate timed as a verification times it
        (``verifier``; cached per policy): what a choice that must meet the budget relies on."""
        return self._timed(candidate, self.verifier, self.verified_, "verified")

    def _timed(self, candidate: Candidate, device: Device, table: dict, kind: str) -> float:
        key = candidate.key()
        if key not in table:
            table[key] = float(device.measure(self.onnx(candidate), self.shape).median_ms)
            self._append({"id": key, "kind": kind, "ms": table[key]})
        return table[key]

    def kernel(self, candidate: Candidate) -> float:
        """The kernel predictor's raw latency (ms) of the deployed candidate (cached)."""
        key = candidate.key()
        if key not in self.kernel_:
            from autocomp.hardware.onnx_io import parse_onnx

            model = parse_onnx(self.onnx(candidate))
            ms = float(self.predictor.predict_onnx(model, self.shape))
            self.kernel_[key] = ms
            self._append({"id": key, "kind": "kernel", "ms": ms})
        return self.kernel_[key]

    # ---------------------------------------------------------------------------- predict
    def calibrate(self, candidates: Sequence[Candidate]) -> None:
        """``predict`` mode: measure ``candidates`` and scale the predictor to them (median
        ratio)."""
        if self.mode != "predict":
            return
        rows = []
        for c in candidates:
            measured, kernel = self.measure(c), self.kernel(c)
            rows.append({"key": c.key(), "measured_ms": measured, "predicted_ms": kernel})
        self.calibration_ = rows
        self.scale_ = float(np.median([r["measured_ms"] / r["predicted_ms"] for r in rows]))

    def predict(self, candidates: Sequence[Candidate], *, measured: bool = True) -> np.ndarray:
        """Expected latency (ms) of each candidate, safety factor included: its measurement
        (``measure``) or the calibrated kernel prediction (``predict``). Either is the one
        estimate of a policy, so ``measured`` (which asks a supernet's latency model for its
        own estimate rather than a measurement) changes nothing here."""
        if self.mode == "measure":
            raw = [self.measure(c) for c in candidates]
        else:
            raw = [self.kernel(c) for c in candidates]
        return self.scale_ * np.asarray(raw, dtype=float)

    def correct(self, candidate: Candidate, measured_ms: float) -> None:
        """Learn from a verification measurement: never expect less than the truth again."""
        expected = float(self.predict([candidate])[0])
        self.corrections_.append(
            {"key": candidate.key(), "expected_ms": expected, "measured_ms": measured_ms}
        )
        if measured_ms > expected:
            self.scale_ *= measured_ms / expected

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "scale": self.scale_,
            "measured": len(self.measured_),
            "verified": len(self.verified_),
            "corrections": self.corrections_,
        }
        if self.mode == "predict":
            ratios = [r["measured_ms"] / r["predicted_ms"] for r in self.calibration_]
            out["calibration"] = self.calibration_
            out["predicted"] = len(self.kernel_)
            # Share of the calibration policies the scaled predictor puts within ±10%.
            within = [abs(self.scale_ / q - 1) <= 0.1 for q in ratios]
            out["calibration_within_10_pct"] = float(np.mean(within)) if ratios else None
        return out

    # ------------------------------------------------------------------------ persistence
    def attach(self, path: Path) -> None:
        """Keep every latency in ``path`` (JSONL) from now on, after reading what it holds (a
        resumed run does not measure again)."""
        tables = {"measured": self.measured_, "kernel": self.kernel_, "verified": self.verified_}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    tables[row["kind"]].setdefault(str(row["id"]), float(row["ms"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a killed run
        else:
            path.write_text(
                "".join(
                    json.dumps({"id": k, "kind": kind, "ms": v}) + "\n"
                    for kind, table in tables.items()
                    for k, v in table.items()
                )
            )
        self._log = path

    def _append(self, row: dict[str, Any]) -> None:
        if self._log is not None:
            with open(self._log, "a") as f:
                f.write(json.dumps(row) + "\n")
