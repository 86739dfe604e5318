"""Per-layer int8 fake quantization of an arbitrary model, on the grid its QDQ export computes.

The search spaces' own layers carry their quantizers; a user's model (a timm network, any
``nn.Module``) does not. Here its plain ``nn.Conv2d``/``nn.Linear`` layers chosen for int8 become
:class:`QConv2d`/:class:`QLinear` in place (same module path, same parameters, so the policy's bit
keys, the state_dict and the ONNX export's layer-to-node mapping are unchanged): per-output-channel
symmetric int8 weights, and uint8 observers on the layer's input and output — the tensors ONNX
Runtime's QDQ format quantizes, whose trained ranges the export then uses.

The output the exporter quantizes is the convolution *after* BatchNorm folding, so BatchNorm is
folded into its conv first (:func:`fold_batchnorm`) where it is the conv output's only consumer;
a conv whose BatchNorm cannot be folded gets no output observer (ONNX Runtime calibrates that
tensor instead). Other layer types (timm's padded ``Conv2dSame``, mixed or conditional convs) keep
fp32: they are not offered an int8 choice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from autocomp.errors import AutocompError
from autocomp.quant.fake import ActQuant, QuantLayer, fake_quant_weight


class QConv2d(nn.Conv2d, QuantLayer):
    """``nn.Conv2d`` with per-layer fake quantization (see the module docstring)."""

    in_q: ActQuant
    out_q: ActQuant | None

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantized:
            return self._conv_forward(x, self.weight, self.bias)
        x = self.in_q(x, self.bits)
        y = self._conv_forward(x, fake_quant_weight(self.weight, self.bits), self.bias)
        return self.out_q(y, self.bits) if self.out_q is not None else y


class QLinear(nn.Linear, QuantLayer):
    """``nn.Linear`` with per-layer fake quantization. On inputs of more than two dimensions
    (exported as MatMul + Add, whose MatMul output precedes the bias) the output observer is
    left out and ONNX Runtime calibrates that tensor."""

    in_q: ActQuant
    out_q: ActQuant | None

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantized:
            return nn.functional.linear(x, self.weight, self.bias)
        flat = x.dim() == 2
        x = self.in_q(x, self.bits)
        y = nn.functional.linear(x, fake_quant_weight(self.weight, self.bits), self.bias)
        return self.out_q(y, self.bits) if flat and self.out_q is not None else y


_WRAPPERS = {nn.Conv2d: QConv2d, nn.Linear: QLinear}


def quantizable(module: nn.Module) -> bool:
    """Layers offered an int8 choice: plain convs and linears (subclasses may compute otherwise)."""
    return type(module) in _WRAPPERS or type(module) in _WRAPPERS.values()


def called_layers(model: nn.Module, example_input: Tensor) -> list[str]:
    """The quantizable layers a forward pass on ``example_input`` runs, in the order it runs them
    (a layer on a branch the input does not take has no node in the exported graph)."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(names[mod]))
        for m in model.modules()
        if quantizable(m)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def fold_batchnorm(model: nn.Module, pairs: Mapping[str, str]) -> list[str]:
    """Fold each BatchNorm of ``pairs`` (conv path → BatchNorm path) into its conv, in place.

    Only BatchNorms whose forward is known are folded: ``nn.BatchNorm2d`` (replaced by an
    identity) and timm's ``BatchNormAct2d`` (replaced by its dropout and activation). Returns the
    convs folded. The model's function is unchanged in eval mode.
    """
    modules = dict(model.named_modules())
    folded = []
    for conv_name, bn_name in pairs.items():
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, _BatchNorm):
            continue
        replacement = _without_norm(bn)
        if replacement is None or bn.running_mean is None or conv.out_channels != bn.num_features:
            continue
        w, b = torch.nn.utils.fusion.fuse_conv_bn_weights(
            conv.weight,
            conv.bias,
            bn.running_mean,
            bn.running_var,
            bn.eps,
            bn.weight if bn.affine else None,
            bn.bias if bn.affine else None,
        )
        conv.weight, conv.bias = w, b
        _set(model, bn_name, replacement)
        folded.append(conv_name)
    return folded


def _without_norm(bn: nn.Module) -> nn.Module | None:
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if type(bn) is BatchNormAct2d:
        return nn.Sequential(bn.drop, bn.act)
    return None


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def quantize_layers(
    model: nn.Module, bits: Mapping[str, int], observe_output: Iterable[str] = ()
) -> nn.Module:
    """Give each layer of ``bits`` its bitwidth, in place; layers below 32 bits become fake-quant
    layers (off until :func:`autocomp.quant.fake.set_quantization` turns them on).

    ``observe_output`` are the layers whose output the export quantizes as is (their BatchNorm
    was folded, or they have none): only those get an output observer.
    """
    observe = set(observe_output)
    for name, b in bits.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise AutocompError(f"the model has no layer {name!r} to quantize") from None
        if b >= 32:
            continue
        if not quantizable(layer):
            raise AutocompError(
                f"layer {name!r} ({type(layer).__name__}) cannot be quantized; only plain "
                "Conv2d and Linear layers can"
            )
        if not isinstance(layer, QuantLayer):
            layer.__class__ = _WRAPPERS[type(layer)]
            layer.add_module("in_q", ActQuant())
            layer.add_module("out_q", ActQuant() if name in observe else None)
        layer.bits = int(b)
    return model


def outputs_as_exported(
    model: nn.Module, bn_after: Mapping[str, str], folded: Iterable[str]
) -> set[str]:
    """Layers whose output tensor is what the exporter quantizes: convs/linears not followed by
    an unfolded BatchNorm."""
    folded = set(folded)
    return {
        name
        for name, m in model.named_modules()
        if quantizable(m) and (name not in bn_after or name in folded)
    }
