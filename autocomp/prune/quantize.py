"""Per-layer int8 fake quantization of an arbitrary model, on the grid its QDQ export computes.

The search spaces' own layers carry their quantizers; a user's model (a timm network, any
``nn.Module``) does not. Here its plain ``nn.Conv2d``/``nn.Linear`` layers chosen for int8 become
:class:`QConv2d`/:class:`QLinear` in place (same module path, same parameters, so the policy's bit
keys, the state_dict and the ONNX export's layer-to-node mapping are unchanged): per-output-channel
symmetric int8 weights, and uint8 observers on the layer's input and output — the tensors ONNX
Runtime's QDQ format quantizes, whose trained ranges the export then uses. The bias lies on the
int32 grid the export stores it on, and a layer reading another int8 layer's output directly
reuses that output's quantizer (:func:`share_quantized_inputs`): the export quantizes such a
tensor once, and single-step differences compound through deep int8 stacks.

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
from autocomp.quant.fake import (
    ActQuant,
    QuantLayer,
    act_qparams,
    fake_quant_bias,
    fake_quant_weight,
    weight_scale,
)


class QConv2d(nn.Conv2d, QuantLayer):
    """``nn.Conv2d`` with per-layer fake quantization (see the module docstring)."""

    in_q: ActQuant
    out_q: ActQuant | None
    input_quantized: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantized:
            return self._conv_forward(x, self.weight, self.bias)
        x = _quantized_input(self, x)
        weight = fake_quant_weight(self.weight, self.bits)
        y = self._conv_forward(x, weight, _quantized_bias(self))
        return self.out_q(y, self.bits) if self.out_q is not None else y


class QLinear(nn.Linear, QuantLayer):
    """``nn.Linear`` with per-layer fake quantization. On inputs of more than two dimensions
    (exported as MatMul + Add, whose MatMul output precedes the bias) the output observer is
    left out and ONNX Runtime calibrates that tensor."""

    in_q: ActQuant
    out_q: ActQuant | None
    input_quantized: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantized:
            return nn.functional.linear(x, self.weight, self.bias)
        flat = x.dim() == 2
        x = _quantized_input(self, x)
        bias = _quantized_bias(self) if flat else self.bias  # MatMul + Add: a float bias
        y = nn.functional.linear(x, fake_quant_weight(self.weight, self.bits), bias)
        return self.out_q(y, self.bits) if flat and self.out_q is not None else y


def _quantized_input(layer: QConv2d | QLinear, x: Tensor) -> Tensor:
    """The layer's input on its int8 grid; one that another int8 layer's output quantizer put
    there already (see :func:`share_quantized_inputs`) is used as is."""
    return x if layer.input_quantized else layer.in_q(x, layer.bits)


def _quantized_bias(layer: QConv2d | QLinear) -> Tensor | None:
    """The bias as the export stores it (see :func:`autocomp.quant.fake.fake_quant_bias`); as is
    while the input has no range yet (ONNX Runtime then calibrates it, the grid is unknown)."""
    if layer.bias is None or not bool(layer.in_q.initialized):
        return layer.bias
    in_scale, _ = act_qparams(layer.in_q.min_val, layer.in_q.max_val, layer.bits)
    return fake_quant_bias(layer.bias, in_scale * weight_scale(layer.weight, layer.bits))


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
    _trace(model, example_input, hooks)
    return list(dict.fromkeys(order))


def _trace(model: nn.Module, example_input: Tensor, hooks: list) -> None:
    """One eval-mode forward pass of ``model`` for its ``hooks``, which are removed after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()


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


def share_quantized_inputs(model: nn.Module, example_input: Tensor) -> list[str]:
    """Let each int8 layer whose input is another int8 layer's quantized output (nothing but
    identities between them) read that tensor as is, in place; returns those layers.

    Why: the export puts one Quantize/Dequantize pair on such a tensor, at the producer's scale.
    Quantizing it again in torch with the reader's own observer (a slightly different range)
    rounds a few percent of its values to the neighbouring step, and a deep int8 stack amplifies
    those flips: MobileNetV3's projection convs feed the next block's expansion conv directly,
    and its all-int8 torch model and ONNX export agreed on 63% of top-1 decisions. The reader's
    ``in_q`` becomes the producer's ``out_q`` (so the export gives the tensor that one scale) and
    is not applied a second time.
    """
    layers = {
        m: n for n, m in model.named_modules() if isinstance(m, QConv2d | QLinear) and m.bits < 32
    }
    # Outputs kept alive (no storage is reused) with their version: an in-place activation
    # (timm's inplace=True) leaves the storage but changes the values.
    produced: list[tuple[Tensor, int, nn.Module]] = []
    shared: list[str] = []

    def hook(layer: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        x = inputs[0]
        for y, version, producer in [] if layer.input_quantized else produced:
            same = x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()
            if same and x._version == version:
                layer.in_q = producer.out_q
                layer.input_quantized = True
                shared.append(layers[layer])
                break
        if layer.out_q is not None and (isinstance(layer, QConv2d) or out.dim() == 2):
            produced.append((out, out._version, layer))

    _trace(model, example_input, [m.register_forward_hook(hook) for m in layers])
    return shared


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
