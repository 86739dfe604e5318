"""The policy space of an existing model: a keep ratio per channel group, int8 or fp32 per layer.

It speaks the same protocol as the architecture spaces (``suggest``/``sample``/``values``/
``encode``/``cost``/``largest``/``smallest``, ``mutate``/``crossover``), so the budgeted Optuna
controller of ``autocomp search`` drives it unchanged. A candidate (:class:`Candidate`) holds the
policy: ``widths`` maps each prunable group (its root layer's module path) to its keep ratio,
``bits`` each quantizable conv/linear layer to 8 or 32; ``arch`` is empty and ``resolution`` is
the model's fixed input side.

Costs are exact: MACs (FLOPs = 2·MACs, as torch's FLOP counter counts them: convolutions and
matrix products) and parameters are counted on the physically pruned network; the ONNX size is
estimated from the layer sizes and bits, anchored on the exported original (the exported file's
size is measured after export).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autocomp.errors import AutocompError
from autocomp.prune import KEEP_RATIOS
from autocomp.prune.pruning import ModelPruner
from autocomp.prune.quantize import (
    fold_batchnorm,
    outputs_as_exported,
    quantize_layers,
    share_quantized_inputs,
)
from autocomp.spaces.base import QDQ_LAYER_BYTES, Param
from autocomp.spaces.candidate import Candidate, Cost

BITS = (8, 32)


class PolicySpace:
    """Pruning + bitwidth policies of one model (see the module docstring).

    ``pruner`` holds the model and its channel groups (none: a bits-only space); ``layers`` are
    the quantizable layers offered int8; ``fp32_size_bytes`` is the exported size of the
    original model in fp32, which anchors the size estimate.
    """

    def __init__(
        self,
        name: str,
        pruner: ModelPruner,
        *,
        resolution: int,
        in_channels: int,
        layers: Sequence[str],
        keep_ratios: Sequence[float] = KEEP_RATIOS,
        bits: Sequence[int] = BITS,
        fp32_size_bytes: int | None = None,
        prune: bool = True,
    ) -> None:
        ratios = tuple(sorted({float(r) for r in keep_ratios}))
        if not ratios or not all(0 < r <= 1 for r in ratios):
            raise AutocompError(f"keep ratios must lie in (0, 1], got {list(keep_ratios)}")
        choices = tuple(sorted({int(b) for b in bits}))
        if not choices or not set(choices) <= {8, 32}:
            raise AutocompError(f"bits must be 8 and/or 32 (what ONNX Runtime runs), got {bits}")
        self.name = name
        self.source = f"compress:{name}"
        self.pruner = pruner
        self.resolution = int(resolution)
        self.in_channels = int(in_channels)
        self.keep_ratios = ratios
        self.bit_choices = choices
        self.groups = list(pruner.groups) if prune else []
        self.layers = list(layers)
        self.params: list[Param] = [Param("widths", g.name, ratios) for g in self.groups]
        if len(choices) > 1:
            self.params += [Param("bits", layer, choices) for layer in self.layers]
        if not self.params:
            raise AutocompError(
                f"nothing to search in {name!r}: no prunable channel group and no layer with a "
                "choice of bits"
            )
        self._params_by_name = {p.name: p for p in self.params}
        self.smallest_bits = min(choices)
        self._stats: dict[str, dict[str, Any]] = {}
        self._anchor = 0
        if fp32_size_bytes is not None:
            whole = Candidate(
                name,
                self.resolution,
                widths={g.name: 1.0 for g in self.groups},
                bits=dict.fromkeys(self.layers, 32),
            )
            # Graph bytes besides the weights; never negative (an exporter that deduplicates
            # equal initializers, e.g. zero-initialised layers of an untrained model, would
            # otherwise make every estimate too small).
            self._anchor = max(0, fp32_size_bytes - self._size(whole, anchored=False))

    def __repr__(self) -> str:
        groups, layers = len(self.groups), len(self.layers)
        return f"PolicySpace(name={self.name!r}, groups={groups}, layers={layers})"

    # ------------------------------------------------------------------------ candidates
    def from_values(self, values: Mapping[str, Any]) -> Candidate:
        """The candidate of {param name: value}; groups/layers without a value keep 1.0 / the
        fixed bitwidth."""
        widths = {g.name: float(values.get(f"widths.{g.name}", 1.0)) for g in self.groups}
        fixed = self.bit_choices[0] if len(self.bit_choices) == 1 else 32
        bits = {layer: int(values.get(f"bits.{layer}", fixed)) for layer in self.layers}
        return Candidate(self.name, self.resolution, widths=widths, bits=bits)

    def values(self, candidate: Candidate) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.params:
            section = candidate.widths if p.section == "widths" else candidate.bits
            out[p.name] = section[p.key]
        return out

    def check(self, candidate: Candidate) -> Candidate:
        """Refuse a candidate of another model, with a keep ratio outside (0, 1] or with bits
        not offered."""
        if candidate.space != self.name:
            raise AutocompError(f"candidate belongs to {candidate.space!r}, not {self.name!r}")
        if set(candidate.widths) != {g.name for g in self.groups}:
            raise AutocompError(f"candidate of {self.name!r}: its groups differ from the space's")
        if set(candidate.bits) != set(self.layers):
            raise AutocompError(f"candidate of {self.name!r}: its layers differ from the space's")
        for name, value in self.values(candidate).items():
            param = self._params_by_name[name]
            # Any keep ratio the pruner realises is a policy (the uniform baselines are found on
            # a finer grid than the search's); bits only those offered.
            ok = 0 < value <= 1 if param.section == "widths" else value in param.choices
            if not ok:
                raise AutocompError(f"candidate of {self.name!r}: {name}={value!r} is not a choice")
        return candidate

    def kinds(self) -> list[str]:
        return list(dict.fromkeys(p.kind for p in self.params))

    def largest(self, bits: int | None = None) -> Candidate:
        """Every group at its largest keep ratio, every layer at ``bits`` (default: the widest
        choice)."""
        b = bits if bits is not None else max(self.bit_choices)
        return self.from_values(
            {p.name: max(p.choices) if p.section == "widths" else b for p in self.params}
        )

    def smallest(self, bits: int | None = None) -> Candidate:
        """Every group at its smallest keep ratio, every layer at ``bits`` (default
        ``smallest_bits``: the lowest, unless the latency stage found the other one faster —
        int8 is not always faster on a device, and the search's achievability check measures
        this candidate as the fastest)."""
        b = bits if bits is not None else self.smallest_bits
        return self.from_values(
            {p.name: min(p.choices) if p.section == "widths" else b for p in self.params}
        )

    def sample(self, rng: np.random.Generator, vary: Collection[str] | None = None) -> Candidate:
        values = {}
        for p in self.params:
            draw = vary is None or p.kind in vary
            values[p.name] = p.choices[rng.integers(len(p.choices))] if draw else max(p.choices)
        return self.from_values(values)

    def suggest(self, trial: Any) -> Candidate:
        return self.from_values(
            {p.name: trial.suggest_categorical(p.name, list(p.choices)) for p in self.params}
        )

    def mutate(self, candidate: Candidate, rng: np.random.Generator, prob: float) -> Candidate:
        current = self.values(self.check(candidate))
        values = {}
        for p in self.params:
            redraw = rng.random() < prob
            values[p.name] = p.choices[rng.integers(len(p.choices))] if redraw else current[p.name]
        return self.from_values(values)

    def crossover(self, a: Candidate, b: Candidate, rng: np.random.Generator) -> Candidate:
        va, vb = self.values(self.check(a)), self.values(self.check(b))
        return self.from_values({p.name: (va, vb)[rng.integers(2)][p.name] for p in self.params})

    def encoding_names(self) -> list[str]:
        return [p.name for p in self.params]

    def encode(self, candidates: list[Candidate]) -> np.ndarray:
        """A (n, params) float32 matrix: each group's keep ratio and each layer's bits."""
        out = np.zeros((len(candidates), len(self.params)), dtype=np.float32)
        for row, c in enumerate(candidates):
            values = self.values(c)
            out[row] = [values[p.name] for p in self.params]
        return out

    # ----------------------------------------------------------------------------- models
    def build(self, candidate: Candidate) -> nn.Module:
        """The pruned network of the candidate (fp32, BatchNorm in place, a fresh copy)."""
        self.check(candidate)
        return self.pruner.prune({k: v for k, v in candidate.widths.items() if v < 1})

    def deploy(self, model: nn.Module, candidate: Candidate) -> nn.Module:
        """Make a built network compute as exported, in place: BatchNorm folded into its convs,
        the candidate's int8 layers fake-quantized (quantization off until switched on), those
        reading another int8 layer's output reusing its quantizer."""
        folded = fold_batchnorm(model, self.pruner.bn_after)
        observe = outputs_as_exported(model, self.pruner.bn_after, folded)
        quantize_layers(model, candidate.bits, observe)
        device = next(model.parameters()).device
        side = self.resolution
        share_quantized_inputs(model, torch.zeros(1, self.in_channels, side, side, device=device))
        return model

    def channels(self, model: nn.Module) -> dict[str, int]:
        """Output channels of each group's root layer in ``model`` (a built network)."""
        out = {}
        for g in self.groups:
            layer = model.get_submodule(g.name)
            out[g.name] = int(getattr(layer, "out_channels", getattr(layer, "out_features", -1)))
        return out

    # ------------------------------------------------------------------------------- cost
    def cost(
        self,
        candidate: Candidate,
        input_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
    ) -> Cost:
        """Exact MACs and parameters of the pruned network, and the estimated ONNX size.

        ``input_shape`` (batch, channels, height, width) may change the batch only.
        """
        self.check(candidate)
        batch = 1
        if input_shape is not None:
            batch = int(input_shape[0])
            if tuple(input_shape[1:]) != (self.in_channels, self.resolution, self.resolution):
                raise AutocompError(
                    f"the policies of {self.name!r} are costed at "
                    f"{(self.in_channels, self.resolution, self.resolution)}, not {input_shape[1:]}"
                )
        stats = self._network_stats(candidate)
        return Cost(
            macs=batch * stats["macs"], params=stats["params"], size_bytes=self._size(candidate)
        )

    def _network_stats(self, candidate: Candidate) -> dict[str, Any]:
        key = ",".join(f"{k}={v:g}" for k, v in sorted(candidate.widths.items()) if v < 1)
        if key not in self._stats:
            model = self.pruner.prune({k: v for k, v in candidate.widths.items() if v < 1}).eval()
            x = torch.zeros(1, self.in_channels, self.resolution, self.resolution)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model(x)
            modules = dict(model.named_modules())
            layers = {}
            for name in self.layers:
                m = modules[name]
                bias = m.bias is not None or name in self.pruner.bn_after
                cout = m.weight.shape[0]
                layers[name] = (m.weight.numel(), cout, bias)
            folded_bn = sum(
                2 * modules[bn].num_features
                for conv, bn in self.pruner.bn_after.items()
                if getattr(modules[bn], "affine", False)
            )
            params = sum(p.numel() for p in model.parameters())
            own = sum(w + c * (modules[n].bias is not None) for n, (w, c, _) in layers.items())
            self._stats[key] = {
                "macs": int(counter.get_total_flops()) // 2,
                "params": int(params),
                "layers": layers,
                "rest": int(params - own - folded_bn),
            }
        return self._stats[key]

    def _size(self, candidate: Candidate, anchored: bool = True) -> int:
        """Estimated exported bytes: each layer's weights and (BN-folded) bias at its bits — int8
        layers with their per-channel scales, int32 bias and QDQ nodes — other parameters fp32."""
        stats = self._network_stats(candidate)
        total = 4 * stats["rest"]
        for name, (weights, cout, bias) in stats["layers"].items():
            if candidate.bits.get(name, 32) >= 32:
                total += 4 * (weights + cout * bias)
            else:
                total += weights + 5 * cout + 12 * cout * bias + QDQ_LAYER_BYTES
        return int(total + (self._anchor if anchored else 0))
