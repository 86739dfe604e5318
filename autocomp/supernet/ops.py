"""Weight-sharing ops: one set of weights, many subnets, chosen by slicing (OFA, BigNAS).

Each dynamic op is a subclass of its torch counterpart whose *active* shape (input/output channels,
kernel size) can be smaller than its allocated one; the forward pass uses the leading channels
and the centred crop of the kernel. ``Layer`` bundles op, BatchNorm, activation and per-layer fake
quantization, and is the unit a search space configures (``set_active``) and copies into a
standalone model (``load_active``). A standalone model uses the same classes at exactly its size,
so its forward pass is the supernet's with the candidate active, operation for operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autocomp.quant.fake import ActQuant, QuantLayer, fake_quant_weight

ACTIVATIONS = {
    "relu": nn.ReLU,
    "hswish": nn.Hardswish,
    "hsigmoid": nn.Hardsigmoid,
    "none": nn.Identity,
}


@dataclass(frozen=True)
class LayerSpec:
    """Static shape of one conv/linear layer of a subnet: all that cost and extraction need.

    ``hw`` is the (height, width) of the layer's output for the candidate's input resolution.
    """

    kind: str  # "conv" or "linear"
    cin: int
    cout: int
    kernel: int = 1
    stride: int = 1
    depthwise: bool = False
    bias: bool = False
    bn: bool = False
    act: str = "none"
    bits: int = 32
    hw: tuple[int, int] = (1, 1)


def dead_border(size: int, kernel: int, stride: int, pad: int) -> int:
    """How many outer rings of a ``kernel`` only meet padding on an input side of ``size``.

    Output ``i`` reads inputs ``i·stride − pad + j`` for taps ``j``; the first ``c`` taps are dead
    when even the last output reads padding with them, the last ``c`` when even the first does.
    Cropping ``c`` rings and ``c`` of padding leaves the output (its size too) unchanged.
    """
    out = (size + 2 * pad - kernel) // stride + 1
    return max(0, min(pad - (out - 1) * stride, kernel - pad - size, (kernel - 1) // 2))


class DynamicConv2d(nn.Conv2d):
    """Conv2d with elastic input/output channels and kernel size (centre crop, 'same' padding)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        depthwise: bool = False,
        bias: bool = False,
    ) -> None:
        groups = out_channels if depthwise else 1
        if depthwise and in_channels != out_channels:
            raise ValueError("a depthwise conv has as many input as output channels")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            kernel_size // 2,
            groups=groups,
            bias=bias,
        )
        self.depthwise = depthwise
        self.set_active(in_channels, out_channels, kernel_size)

    def set_active(self, cin: int, cout: int, kernel: int) -> None:
        if cout > self.out_channels or cin > self.in_channels or kernel > self.kernel_size[0]:
            raise ValueError(f"active shape {cin}->{cout} k{kernel} exceeds {self}")
        self.active_in, self.active_out, self.active_kernel = cin, cout, kernel

    def active_weight(self) -> Tensor:
        k, full = self.active_kernel, self.kernel_size[0]
        if (self.active_out, self.active_in, k) == (self.out_channels, self.in_channels, full):
            return self.weight  # unsliced: exporters see the parameter itself
        lo = (full - k) // 2
        cin = 1 if self.depthwise else self.active_in
        return self.weight[: self.active_out, :cin, lo : lo + k, lo : lo + k]

    def active_bias(self) -> Tensor | None:
        if self.bias is None or self.active_out == self.out_channels:
            return self.bias
        return self.bias[: self.active_out]

    def forward(self, x: Tensor, bits: int = 32) -> Tensor:
        weight = self.active_weight()
        if bits < 32:
            weight = fake_quant_weight(weight, bits)  # scales from the whole kernel, as deployed
        k, pad = self.active_kernel, self.active_kernel // 2
        if self.training:
            # Taps that only ever meet zero padding add nothing and get zero gradient; on CPU the
            # backward of a 7×7 depthwise conv on a 1×1 or 2×2 map took 10× its forward, most of
            # a training step. Eval mode (export, FLOP counting) keeps the kernel whole.
            crop = min(dead_border(n, k, self.stride[0], pad) for n in x.shape[-2:])
            if crop:
                weight = weight[:, :, crop : k - crop, crop : k - crop]
                pad -= crop
        groups = self.active_out if self.depthwise else 1
        return F.conv2d(x, weight, self.active_bias(), self.stride, pad, 1, groups)

    @torch.no_grad()
    def permute(self, out: Tensor | None = None, inp: Tensor | None = None) -> None:
        """Reorder output and/or input channels in place (importance sorting)."""
        if out is not None:
            self.weight.copy_(self.weight[out])
            if self.bias is not None:
                self.bias.copy_(self.bias[out])
        if inp is not None and not self.depthwise:
            self.weight.copy_(self.weight[:, inp])


class DynamicLinear(nn.Linear):
    """Linear layer with elastic input/output features."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.set_active(in_features, out_features)

    def set_active(self, cin: int, cout: int, kernel: int = 1) -> None:
        if cout > self.out_features or cin > self.in_features:
            raise ValueError(f"active shape {cin}->{cout} exceeds {self}")
        self.active_in, self.active_out = cin, cout

    def active_weight(self) -> Tensor:
        if (self.active_out, self.active_in) == (self.out_features, self.in_features):
            return self.weight
        return self.weight[: self.active_out, : self.active_in]

    def active_bias(self) -> Tensor | None:
        if self.bias is None or self.active_out == self.out_features:
            return self.bias
        return self.bias[: self.active_out]

    def forward(self, x: Tensor, bits: int = 32) -> Tensor:
        weight = self.active_weight()
        if bits < 32:
            weight = fake_quant_weight(weight, bits)
        return F.linear(x, weight, self.active_bias())

    @torch.no_grad()
    def permute(self, out: Tensor | None = None, inp: Tensor | None = None) -> None:
        if out is not None:
            self.weight.copy_(self.weight[out])
            if self.bias is not None:
                self.bias.copy_(self.bias[out])
        if inp is not None:
            self.weight.copy_(self.weight[:, inp])


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the leading channels of its input; running stats are sliced, not shared.

    In training mode the active slice of the running statistics is updated in place, with the same
    momentum rule as ``nn.BatchNorm2d`` (``momentum=None`` averages cumulatively, which is what BN
    recalibration uses).
    """

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum
            factor = 1.0 / float(self.num_batches_tracked) if momentum is None else momentum
        use_batch = self.training or self.running_mean is None
        return F.batch_norm(
            x,
            None if self.running_mean is None else self.running_mean[:c],
            None if self.running_var is None else self.running_var[:c],
            None if self.weight is None else self.weight[:c],
            None if self.bias is None else self.bias[:c],
            use_batch,
            factor,
            self.eps,
        )

    @torch.no_grad()
    def permute(self, out: Tensor) -> None:
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            if t is not None:
                t.copy_(t[out])


class Layer(QuantLayer):
    """Conv or linear op, optional BatchNorm, activation, and per-layer fake quantization.

    With ``quantize`` on and fewer than 32 active bits, the input and the (post-BN, pre-activation)
    output are fake-quantized per tensor and the weight per channel: the points where ONNX
    Runtime's QDQ graph quantizes a Conv/Gemm node after BatchNorm folding.
    """

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        if spec.kind == "conv":
            self.op: DynamicConv2d | DynamicLinear = DynamicConv2d(
                spec.cin, spec.cout, spec.kernel, spec.stride, spec.depthwise, spec.bias
            )
        else:
            self.op = DynamicLinear(spec.cin, spec.cout, spec.bias)
        self.bn = DynamicBatchNorm2d(spec.cout) if spec.bn else None
        self.act = ACTIVATIONS[spec.act]()
        self.in_q = ActQuant()
        self.out_q = ActQuant()
        self.spec = spec
        self.bits = spec.bits

    def set_active(self, spec: LayerSpec) -> None:
        self.op.set_active(spec.cin, spec.cout, spec.kernel)
        self.spec = spec
        self.bits = spec.bits

    def forward(self, x: Tensor) -> Tensor:
        bits = self.bits if self.quantized else 32
        if bits < 32:
            x = self.in_q(x, bits)
        x = self.op(x, bits)
        if self.bn is not None:
            x = self.bn(x)
        if bits < 32:
            x = self.out_q(x, bits)
        return self.act(x)

    @torch.no_grad()
    def load_active(self, source: Layer) -> None:
        """Copy ``source``'s active slice (weights, BN stats, observer ranges) into this layer."""
        if source.spec != self.spec:
            raise ValueError(f"cannot load a {source.spec} slice into a {self.spec} layer")
        self.op.weight.copy_(source.op.active_weight())
        if self.op.bias is not None:
            self.op.bias.copy_(source.op.active_bias())
        if self.bn is not None and source.bn is not None:
            c = self.spec.cout
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(self.bn, name).copy_(getattr(source.bn, name)[:c])
            self.bn.num_batches_tracked.copy_(source.bn.num_batches_tracked)
        self.in_q.load_state_dict(source.in_q.state_dict())
        self.out_q.load_state_dict(source.out_q.state_dict())
        self.quantize = source.quantize

    def permute(self, out: Tensor | None = None, inp: Tensor | None = None) -> None:
        self.op.permute(out, inp)
        if out is not None and self.bn is not None:
            self.bn.permute(out)

    def importance(self) -> Tensor:
        """L1 norm of the weights reading each input channel: OFA's channel importance."""
        w = self.op.weight.detach().abs()
        return w.sum(dim=tuple(d for d in range(w.dim()) if d != 1))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with elastic channels: the squeeze width follows the input's."""

    def __init__(self, reduce: LayerSpec, expand: LayerSpec) -> None:
        super().__init__()
        self.reduce = Layer(reduce)
        self.expand = Layer(expand)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.expand(self.reduce(x.mean((2, 3), keepdim=True)))

    def permute(self, channels: Tensor) -> None:
        self.reduce.permute(inp=channels)
        self.expand.permute(out=channels)


class Stage(nn.Sequential):
    """A sequence of blocks of which the first ``depth`` run (elastic depth)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__(*blocks)
        self.depth = len(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in list(self)[: self.depth]:
            x = block(x)
        return x


def reorder(
    producers: Sequence[Layer], consumers: Sequence[Layer], se: Sequence[SqueezeExcite] = ()
) -> None:
    """Sort the channels between producers and consumers by importance, most important first.

    Every producer's output channels, the SE blocks acting on them and every consumer's input
    channels are permuted alike, so the network's function is unchanged while a width slice now
    keeps the most important channels (importance: the consumers' summed weight L1 norms).
    """
    order = torch.argsort(sum(c.importance() for c in consumers), descending=True)
    for layer in producers:
        layer.permute(out=order)
    for block in se:
        block.permute(order)
    for layer in consumers:
        layer.permute(inp=order)
