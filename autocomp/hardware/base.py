"""The measurement protocol: where latency truth comes from.

A ``Device`` runs an ONNX model and reports a ``Measurement``; its ``DeviceInfo`` is the *profile
key* under which measurements and fitted predictors are stored, so two devices whose info differs
in any field that changes latency (runtime version, CPU model, threads, batch, provider) never share
a predictor silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import onnx

#: What ``Device.measure`` accepts as a model: a path, serialized bytes, or an in-memory proto.
OnnxModel = str | Path | bytes | onnx.ModelProto


@dataclass(frozen=True)
class DeviceInfo:
    """Identity of a measurement target; ``profile`` is its stable key."""

    kind: str  # "cpu", "torch-cpu", "cuda", "remote"
    runtime: str  # "onnxruntime" or "torch"
    runtime_version: str
    processor: str  # CPU model name or GPU name
    threads: int
    batch: int
    provider: str  # e.g. "CPUExecutionProvider", "torch-eager"
    precisions: tuple[str, ...] = ("fp32",)  # what the runtime executes fast, e.g. ("fp32", "int8")
    machine: str = ""  # ISA, e.g. "x86_64"
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def profile(self) -> str:
        """Stable, filesystem-safe key: runtime, version, processor, threads and batch."""
        proc = "".join(c if c.isalnum() else "-" for c in self.processor.lower()).strip("-")
        while "--" in proc:
            proc = proc.replace("--", "-")
        return (
            f"{self.kind}_{self.runtime}-{self.runtime_version}_{self.machine or 'any'}_{proc}"
            f"_t{self.threads}_b{self.batch}"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["precisions"] = list(self.precisions)
        out["profile"] = self.profile
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceInfo:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["precisions"] = tuple(kwargs.get("precisions", ("fp32",)))
        return cls(**kwargs)

    def with_batch(self, batch: int) -> DeviceInfo:
        return replace(self, batch=int(batch))


@dataclass(frozen=True)
class Measurement:
    """Latency of one model on one device, from many timed runs after warm-up.

    ``node_times_ms`` maps each executed node (the runtime's name, after its graph fusions) to its
    median time, when the device was asked to profile; it feeds the kernel-level latency predictor.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    samples: tuple[float, ...]
    info: DeviceInfo
    node_times_ms: dict[str, float] | None = None
    node_ops: dict[str, str] | None = None  # node name -> op type, when profiled

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "p10_ms": self.p10_ms,
            "p90_ms": self.p90_ms,
            "samples": list(self.samples),
            "info": self.info.to_dict(),
            "node_times_ms": self.node_times_ms,
            "node_ops": self.node_ops,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        return cls(
            median_ms=float(data["median_ms"]),
            p10_ms=float(data["p10_ms"]),
            p90_ms=float(data["p90_ms"]),
            samples=tuple(float(s) for s in data["samples"]),
            info=DeviceInfo.from_dict(data["info"]),
            node_times_ms=data.get("node_times_ms"),
            node_ops=data.get("node_ops"),
        )


@runtime_checkable
class Device(Protocol):
    """Anything that can run an ONNX model and time it truthfully."""

    @property
    def info(self) -> DeviceInfo: ...

    def measure(
        self, onnx_model: OnnxModel, input_shape: tuple[int, ...], *, profile: bool = False
    ) -> Measurement:
        """Time ``onnx_model`` on an input of ``input_shape`` (batch first)."""
        ...
