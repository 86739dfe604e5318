"""Torch devices: ``torch-cpu`` and ``cuda[:N]`` time ``nn.Module`` s in eager mode.

Eager PyTorch is what many users deploy on GPUs and what they train with, so these devices time a
module as it is (in eval mode, under ``torch.inference_mode``), synchronising CUDA around every
run so that a sample is the kernels' time and not just their launch. An ONNX model given to
``cuda`` runs on ONNX Runtime's CUDAExecutionProvider when that is installed; ``torch-cpu`` does
not run ONNX (the ``cpu`` device does).
"""

from __future__ import annotations

import copy
import platform
from functools import cached_property

import torch
from torch import nn

from autocomp.errors import AutocompError
from autocomp.hardware.base import DeviceInfo, Measurement, OnnxModel
from autocomp.hardware.onnx_io import one_line
from autocomp.hardware.ort_device import CUDA, OrtDevice
from autocomp.hardware.timing import DEFAULT_TIMING, Timing, cpu_model, summarize, time_runs

NO_CUDA = "no CUDA GPU available here (torch.cuda.is_available() is False)"


class TorchDevice:
    """Times ``nn.Module`` s with eager PyTorch on the CPU (``cuda=None``) or on GPU ``cuda``."""

    def __init__(
        self, threads: int = 1, *, cuda: int | None = None, timing: Timing = DEFAULT_TIMING
    ):
        if threads < 1:
            raise AutocompError(f"threads must be at least 1, got {threads}")
        if cuda is not None:
            if not torch.cuda.is_available():
                raise AutocompError(NO_CUDA)
            count = torch.cuda.device_count()
            if not 0 <= cuda < count:
                raise AutocompError(f"no GPU cuda:{cuda} here (this machine has {count})")
        self.threads = threads
        self.cuda = cuda
        self.timing = timing
        self.clock = timing.resolve_clock(in_calling_thread=cuda is None and threads == 1)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.cuda is None else torch.device("cuda", self.cuda)

    @cached_property
    def info(self) -> DeviceInfo:
        """Who measures (batch 1; a measurement reports the batch it actually used)."""
        if self.cuda is None:
            kind, processor, precisions = "torch-cpu", cpu_model(), ("fp32",)
            extra = {"clock": self.clock}
        else:
            kind, processor = "cuda", torch.cuda.get_device_name(self.cuda)
            bf16 = ("bf16",) if torch.cuda.is_bf16_supported() else ()
            precisions = ("fp32", "fp16", *bf16)
            extra = {"clock": self.clock, "cuda": str(torch.version.cuda)}
        return DeviceInfo(
            kind=kind,
            runtime="torch",
            runtime_version=torch.__version__,
            processor=processor,
            threads=self.threads,
            batch=1,
            provider="torch-eager",
            precisions=precisions,
            machine=platform.machine(),
            extra=extra,
        )

    def measure(
        self,
        onnx_model: OnnxModel | nn.Module,
        input_shape: tuple[int, ...],
        *,
        profile: bool = False,
    ) -> Measurement:
        """Time an ``nn.Module`` (or, on ``cuda``, an ONNX model with ONNX Runtime)."""
        if not isinstance(onnx_model, nn.Module):
            return self._onnx_device().measure(onnx_model, input_shape, profile=profile)
        if profile:
            raise AutocompError(
                "per-node profiles come from ONNX Runtime: measure the ONNX export on 'cpu' "
                "with profile=True"
            )
        # A copy, so that the caller's module keeps its device and train/eval mode.
        model = copy.deepcopy(onnx_model).to(self.device).eval()
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        x = torch.randn(*input_shape, device=self.device, dtype=dtype)
        on_gpu = self.cuda is not None

        def run() -> None:
            model(x)
            if on_gpu:
                torch.cuda.synchronize(self.device)

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                try:
                    run()
                except Exception as err:
                    raise AutocompError(f"the model failed to run: {one_line(err)}") from None
                samples = time_runs(run, self.timing, clock=self.clock)
        finally:
            torch.set_num_threads(previous_threads)
        median, p10, p90 = summarize(samples)
        return Measurement(
            median_ms=median,
            p10_ms=p10,
            p90_ms=p90,
            samples=tuple(samples),
            info=self.info.with_batch(input_shape[0]),
        )

    def _onnx_device(self) -> OrtDevice:
        if self.cuda is None:
            raise AutocompError(
                "torch-cpu times nn.Modules; measure ONNX models with --device cpu (ONNX Runtime)"
            )
        try:
            return OrtDevice(self.threads, cuda=self.cuda, timing=self.timing)
        except AutocompError:
            raise AutocompError(
                f"ONNX models on cuda run with ONNX Runtime's {CUDA}, which this onnxruntime "
                "build lacks (install onnxruntime-gpu), or measure the nn.Module instead"
            ) from None
