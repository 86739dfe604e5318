"""Per-layer fake quantization in the scheme ONNX Runtime's QDQ format executes.

Weights: per-output-channel symmetric signed integers on [-(2^(b-1) - 1), 2^(b-1) - 1] (for int8:
[-127, 127], scale = max|w| / 127, zero point 0), which is what ``onnxruntime.quantization``
produces for symmetric int8 weights; [-64, 64] on x86-64 CPUs without VNNI, where ORT needs
``reduce_range`` (:func:`reduced_int8_weights`). Because the scale is per output channel,
quantizing a conv's weight and then applying its BatchNorm equals quantizing the BN-folded weight
that the exporter writes, so training and deployment see the same grid. Activations: per-tensor
affine unsigned integers on [0, 2^b - 1] (uint8 for 8 bits), ranges tracked by an exponential
moving average of the batch min/max in training mode and frozen in eval mode. Both use the
``torch.fake_quantize_*`` primitives, whose gradients are straight-through inside the range. ORT
CPU executes 8 bits; other widths below 32 (a space may list 4 or 16 for size-only budgets) are
simulated the same way.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn


@cache
def reduced_int8_weights() -> bool:
    """Whether this CPU needs int8 weights on [-64, 64] (ONNX Runtime's ``reduce_range``).

    On x86-64 without VNNI, ORT's uint8 x int8 kernels add pairs of products in saturating
    int16 (255 * 127 * 2 overflows it), so full-range weights compute something else than the
    fake-quantized model: on an AVX2-only AMD EPYC the exported models of the test suite agreed
    with torch on 94% of images instead of >= 99%. With 7-bit weights the sums fit.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" not in flags and "avx_vnni" not in flags


def weight_qmax(bits: int) -> int:
    """The largest weight integer of ``bits``: 2^(b-1) - 1, or 64 for int8 where
    :func:`reduced_int8_weights`."""
    return 64 if bits == 8 and reduced_int8_weights() else 2 ** (bits - 1) - 1


def weight_scale(weight: Tensor, bits: int = 8) -> Tensor:
    """Per-output-channel symmetric scale of a conv/linear weight: max|w| / :func:`weight_qmax`."""
    absmax = weight.detach().abs().flatten(1).amax(dim=1)
    return (absmax / weight_qmax(bits)).clamp_min(torch.finfo(torch.float32).tiny).float()


def fake_quant_weight(weight: Tensor, bits: int = 8) -> Tensor:
    """Per-output-channel symmetric fake quantization of a conv/linear weight."""
    qmax = weight_qmax(bits)
    scale = weight_scale(weight, bits)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -qmax, qmax)


def fake_quant_bias(bias: Tensor, scale: Tensor) -> Tensor:
    """``bias`` rounded to the int32 grid ONNX Runtime stores it on (per-channel ``scale`` =
    input scale × weight scale, zero point 0), straight-through for the gradient.

    Why: the exporter quantizes a Conv/Gemm bias so; an fp32 bias in torch differs by up to
    half that step, which for a high-gain layer (a BN-folded depthwise conv) is a sizeable part
    of an output step and flips the output's rounding, and deep int8 stacks amplify such flips.
    """
    rounded = torch.round(bias.detach() / scale) * scale
    return bias + (rounded - bias.detach())


def act_qparams(lo: Tensor, hi: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Unsigned scale and zero point for the range [lo, hi], widened to hold 0 (as ORT does)."""
    qmax = 2**bits - 1
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp_min(torch.finfo(torch.float32).eps)
    zero = torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)
    return scale, zero


class ActQuant(nn.Module):
    """Per-tensor unsigned fake quantizer with an EMA min/max observer.

    It observes while the module is in training mode and is frozen in eval mode; until it has seen
    a batch it passes its input through unchanged (there is no range to quantize with yet).
    """

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: Tensor, bits: int = 8) -> Tensor:
        if self.training:
            self.observe(x)
        if not bool(self.initialized):
            return x
        scale, zero = act_qparams(self.min_val, self.max_val, bits)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 2**bits - 1)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        lo, hi = x.detach().amin().float(), x.detach().amax().float()
        if bool(self.initialized):
            lo = torch.lerp(self.min_val, lo, self.momentum)
            hi = torch.lerp(self.max_val, hi, self.momentum)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


class QuantLayer(nn.Module):
    """Base of layers with a per-layer bitwidth: fake-quantized when ``quantize`` and bits < 32."""

    bits: int = 32
    quantize: bool = False

    @property
    def quantized(self) -> bool:
        return self.quantize and self.bits < 32


def set_quantization(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn fake quantization of every low-bit layer of ``model`` on or off."""
    for module in model.modules():
        if isinstance(module, QuantLayer):
            module.quantize = enabled
    return model
