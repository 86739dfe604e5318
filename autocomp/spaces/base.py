"""What every search space shares: flat categorical choices, plans, exact cost, supernet, build.

A space is a list of categorical ``Param``s (resolution, architecture choices, per-layer keep
ratios, per-layer bits). A ``Candidate`` assigns one value to each *active* param (blocks beyond a
stage's depth have none). A family turns a candidate into a ``Plan`` — the exact shape of every
conv/linear layer, keyed by its module path — and from the plan come, by one code path each, the
analytic cost, the supernet's active configuration and the standalone model; so the three can
only disagree if the plan is wrong, which the tests compare against torch's own counters.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from torch import Tensor, nn

from autocomp.errors import AutocompError
from autocomp.spaces.candidate import Candidate, Cost
from autocomp.spaces.schema import Schema
from autocomp.supernet.ops import Layer, LayerSpec, Stage, reorder
from autocomp.supernet.supernet import Supernet

#: Bytes of the exported ONNX file per graph node besides the weights: the node, its names and
#: its tensors' names (fitted on fp32 exports of both built-in families and tiny variants, where
#: it predicts the file size within -0.7%..+1.2%).
ONNX_NODE_BYTES = 225
#: Extra bytes per quantized layer in ONNX Runtime's QDQ format (``quantize_static``): its
#: Quantize/DequantizeLinear nodes (about 5.5 per layer) and activation scales. Fitted on mixed
#: int8/fp32 exports: within 1% on the built-in spaces, within 10% on tiny all-int8 networks.
QDQ_LAYER_BYTES = 2200


@dataclass(frozen=True)
class Param:
    """One categorical choice. ``block`` = (stage, index) when it exists only inside the depth."""

    section: str  # "resolution", "arch", "widths" or "bits"
    key: str
    choices: tuple[Any, ...]
    block: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """The Optuna parameter name (stable across versions of a space)."""
        return self.section if self.section == "resolution" else f"{self.section}.{self.key}"

    @property
    def kind(self) -> str:
        """What the choice is: resolution, depth, width, kernel, expand, ratio, keep or bits."""
        if self.section == "arch":
            return self.key.split(".")[0]
        return {"widths": "keep"}.get(self.section, self.section)


@dataclass(frozen=True)
class Plan:
    """A candidate made concrete: active depth per stage and the spec of every layer."""

    depths: tuple[int, ...]
    layers: dict[str, LayerSpec]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor``, at least ``divisor``: channel counts that vectorise well."""
    return max(divisor, int(value / divisor + 0.5) * divisor)


def conv_out(size: int, stride: int) -> int:
    """Output side of a 'same'-padded odd-kernel convolution."""
    return (size - 1) // stride + 1


def layer_macs(spec: LayerSpec) -> int:
    per_out = (1 if spec.depthwise else spec.cin) * spec.kernel**2
    return spec.hw[0] * spec.hw[1] * spec.cout * per_out


def layer_params(spec: LayerSpec) -> int:
    weights = spec.cout * (1 if spec.depthwise else spec.cin) * spec.kernel**2
    return weights + spec.cout * (int(spec.bias) + 2 * int(spec.bn))


def layer_bytes(spec: LayerSpec) -> int:
    """Bytes of the layer's initializers after export (BatchNorm folded into a conv bias).

    fp32: 4 bytes per weight and bias. Quantized (QDQ): ``bits``/8 bytes per weight, a per-channel
    fp32 scale and zero point, an int32 bias with its own scale and zero point, plus
    ``QDQ_LAYER_BYTES``; 4- and 16-bit layers are modeled the same way (size-only budgets).
    """
    weights = spec.cout * (1 if spec.depthwise else spec.cin) * spec.kernel**2
    has_bias = spec.bias or spec.bn
    if spec.bits == 32:
        return 4 * (weights + spec.cout * has_bias)
    packed = -(-weights * spec.bits // 8)
    zero_bytes = 1 if spec.bits <= 8 else 2
    bias = spec.cout * 12 if has_bias else 0
    return packed + spec.cout * (4 + zero_bytes) + bias + QDQ_LAYER_BYTES


class Network(nn.Module):
    """Stem, stages of blocks, head layers (convs, then global pooling, then linears), classifier.

    Built from a ``Plan`` at exactly the plan's sizes; the supernet is the largest candidate's
    network, configured per candidate by ``SearchSpace.configure``. ``block`` builds one block from
    the specs under its prefix and whether it is the first of its stage.
    """

    def __init__(
        self, plan: Plan, block: Callable[[dict[str, LayerSpec], bool], nn.Module]
    ) -> None:
        super().__init__()
        specs = plan.layers
        self.stem = Layer(specs["stem"])
        self.stages = nn.ModuleList(
            Stage([block(_under(specs, f"stages.{s}.{b}."), b == 0) for b in range(depth)])
            for s, depth in enumerate(plan.depths)
        )
        self.head = nn.ModuleDict({k: Layer(v) for k, v in _under(specs, "head.").items()})
        self.classifier = Layer(specs["classifier"])

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        for layer in self.head.values():
            if layer.spec.kind == "linear" and x.dim() == 4:
                x = x.mean((2, 3))
            x = layer(x)
        if x.dim() == 4:
            x = x.mean((2, 3))
        return self.classifier(x)

    def reorder_channels(self) -> None:
        """Importance-sort every channel group not tied to a residual stream."""
        reorder([self.stem], self.stages[0][0].inputs())
        for stage in self.stages:
            for block in stage:
                block.reorder_channels()
        head = [*self.head.values(), self.classifier]
        for producer, consumer in itertools.pairwise(head):
            reorder([producer], [consumer])


def _under(specs: dict[str, LayerSpec], prefix: str) -> dict[str, LayerSpec]:
    return {k[len(prefix) :]: v for k, v in specs.items() if k.startswith(prefix)}


class SearchSpace:
    """A family of networks described by a YAML file; see the module docstring.

    Subclasses parse their YAML (``_parse``), list their choices (``_params``), turn a candidate
    into a plan (``plan``) and build the network of a plan (``network``); everything else is here.
    """

    family: ClassVar[str]

    def __init__(
        self,
        name: str,
        config: dict[str, Any],
        source: str,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        self.name = name
        self.source = source
        self.num_classes = num_classes
        self.in_channels = in_channels
        self._parse(config, Schema(source))
        self.params: list[Param] = self._params()
        self._params_by_name = {p.name: p for p in self.params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, params={len(self.params)})"

    # -- family specific -------------------------------------------------------------------
    def _parse(self, config: dict[str, Any], schema: Schema) -> None:
        raise NotImplementedError

    def _params(self) -> list[Param]:
        raise NotImplementedError

    def plan(
        self,
        candidate: Candidate,
        num_classes: int | None = None,
        in_channels: int | None = None,
        hw: tuple[int, int] | None = None,
    ) -> Plan:
        """Every layer's exact shape for ``candidate`` (``hw`` overrides the input size)."""
        raise NotImplementedError

    def network(self, plan: Plan) -> Network:
        raise NotImplementedError

    def extra_nodes(self, plan: Plan) -> int:
        """Exported graph nodes besides the layers and their activations (adds, pooling, ...)."""
        raise NotImplementedError

    # -- candidates ------------------------------------------------------------------------
    def _active(self, param: Param, values: dict[str, Any]) -> bool:
        if param.block is None:
            return True
        stage, index = param.block
        return index < values[f"arch.depth.{stage}"]

    def from_values(self, values: dict[str, Any]) -> Candidate:
        """The canonical candidate of {param name: value} (the inverse of ``values``).

        Every active param needs a value; values of blocks beyond their stage's depth may be
        given and are dropped, so equal networks give equal candidates.
        """
        sections: dict[str, dict[str, Any]] = {"arch": {}, "widths": {}, "bits": {}}
        for p in self.params:
            if p.section != "resolution" and self._active(p, values):
                sections[p.section][p.key] = values[p.name]
        return Candidate(self.name, int(values["resolution"]), **sections)

    def values(self, candidate: Candidate) -> dict[str, Any]:
        """The candidate as {param name: value}, active params only."""
        out: dict[str, Any] = {"resolution": candidate.resolution}
        for section in ("arch", "widths", "bits"):
            for key, value in getattr(candidate, section).items():
                out[f"{section}.{key}"] = value
        return out

    def check(self, candidate: Candidate) -> Candidate:
        """Refuse a candidate of another space, with missing, unknown or out-of-space values."""
        if candidate.space != self.name:
            raise AutocompError(
                f"candidate belongs to space {candidate.space!r}, not {self.name!r}"
            )
        values = self.values(candidate)
        for name, value in values.items():
            p = self._params_by_name.get(name)
            if p is None:
                raise AutocompError(f"candidate of space {self.name!r}: unknown choice {name!r}")
            if value not in p.choices:
                raise AutocompError(
                    f"candidate of space {self.name!r}: {name}={value!r} is not one of "
                    f"{list(p.choices)}"
                )
        missing = [
            p.name
            for p in self.params
            if p.name not in values and (p.block is None or self._active(p, values))
        ]
        if missing:
            raise AutocompError(f"candidate of space {self.name!r}: missing {missing[0]!r}")
        return candidate

    def _extreme(self, pick: Callable[[tuple[Any, ...]], Any]) -> Candidate:
        return self.from_values({p.name: pick(p.choices) for p in self.params})

    def largest(self) -> Candidate:
        """Every choice at its maximum (resolution, depth, kernel, expand, width, 32 bits)."""
        return self._extreme(max)

    def smallest(self) -> Candidate:
        """Every choice at its minimum (the lowest bitwidth too)."""
        return self._extreme(min)

    def kinds(self) -> list[str]:
        """The kinds of choice this space has (see ``Param.kind``), in order of appearance."""
        return list(dict.fromkeys(p.kind for p in self.params))

    def sample(self, rng: np.random.Generator, vary: Collection[str] | None = None) -> Candidate:
        """A uniformly random candidate (each choice independently uniform).

        ``vary`` limits the randomness to some kinds of choice (e.g. ``{"kernel", "depth"}``),
        the others staying at their largest value: the phases of progressive shrinking (OFA).
        """
        unknown = set(vary or ()) - set(self.kinds())
        if unknown:
            raise AutocompError(
                f"space {self.name!r} has no choice kind {sorted(unknown)[0]!r} "
                f"(it has {', '.join(self.kinds())})"
            )
        values = {}
        for p in self.params:
            draw = vary is None or p.kind in vary
            values[p.name] = p.choices[rng.integers(len(p.choices))] if draw else max(p.choices)
        return self.from_values(values)

    def suggest(self, trial: Any) -> Candidate:
        """Ask an Optuna trial for a candidate; block choices are asked only inside the depth."""
        values: dict[str, Any] = {}
        for p in self.params:
            if self._active(p, values):
                values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        return self.from_values(values)

    def mutate(self, candidate: Candidate, rng: np.random.Generator, prob: float) -> Candidate:
        """Resample each choice with probability ``prob`` (choices absent in the parent too)."""
        current = self.values(self.check(candidate))
        values = {}
        for p in self.params:
            redraw = rng.random() < prob or p.name not in current
            values[p.name] = p.choices[rng.integers(len(p.choices))] if redraw else current[p.name]
        return self.from_values(values)

    def crossover(self, a: Candidate, b: Candidate, rng: np.random.Generator) -> Candidate:
        """Each choice from one parent at random (from the parent that has it, else random)."""
        va, vb = self.values(self.check(a)), self.values(self.check(b))
        values = {}
        for p in self.params:
            have = [v[p.name] for v in (va, vb) if p.name in v]
            pool = [have[rng.integers(len(have))]] if have else list(p.choices)
            values[p.name] = pool[rng.integers(len(pool))]
        return self.from_values(values)

    # -- encoding --------------------------------------------------------------------------
    def encoding_names(self) -> list[str]:
        """Column names of ``encode``: one per param, in the space's fixed order."""
        return [p.name for p in self.params]

    def encode(self, candidates: list[Candidate]) -> np.ndarray:
        """A (n, len(params)) float32 matrix: each choice's numeric value, 0 where inactive.

        Columns: resolution; per stage its depth and width; per block its kernel, expand ratio
        (or bottleneck ratio), keep ratios and bits; then the stem/head keep ratios and bits.
        """
        index = {p.name: i for i, p in enumerate(self.params)}
        out = np.zeros((len(candidates), len(self.params)), dtype=np.float32)
        for row, c in enumerate(candidates):
            for name, value in self.values(c).items():
                out[row, index[name]] = value
        return out

    # -- cost, supernet, build -------------------------------------------------------------
    def cost(
        self,
        candidate: Candidate,
        input_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
    ) -> Cost:
        """Exact MACs and parameters, and the exported ONNX size, from the plan alone.

        ``input_shape`` is (batch, channels, height, width); by default (1, in_channels, r, r).
        """
        self.check(candidate)
        batch, channels, hw = 1, None, None
        if input_shape is not None:
            batch, channels, hw = input_shape[0], input_shape[1], tuple(input_shape[2:4])
        plan = self.plan(candidate, num_classes, channels, hw)
        specs = plan.layers.values()
        macs = batch * sum(layer_macs(s) for s in specs)
        params = sum(layer_params(s) for s in specs)
        nodes = sum(1 + (s.act != "none") for s in specs) + self.extra_nodes(plan)
        size = sum(layer_bytes(s) for s in specs) + ONNX_NODE_BYTES * nodes
        return Cost(macs=macs, params=params, size_bytes=size)

    def supernet(self, num_classes: int | None = None, in_channels: int | None = None) -> Supernet:
        """A freshly initialised supernet (the largest candidate's network, weights shared)."""
        return Supernet(self, num_classes or self.num_classes, in_channels or self.in_channels)

    def configure(self, net: Network, plan: Plan) -> None:
        """Make ``net`` (a supernet's) run ``plan``: stage depths and every layer's active shape."""
        for stage, depth in zip(net.stages, plan.depths, strict=True):
            stage.depth = depth
        for name, spec in plan.layers.items():
            net.get_submodule(name).set_active(spec)

    def build(
        self,
        candidate: Candidate,
        supernet: Supernet | None = None,
        num_classes: int | None = None,
        in_channels: int | None = None,
    ) -> Network:
        """A standalone network of exactly the candidate's size.

        With ``supernet``, the candidate's weight slices, BatchNorm statistics, quantizer ranges
        and quantization switch are copied, so its logits equal the supernet's with the candidate
        active; otherwise it is freshly initialised.
        """
        self.check(candidate)
        if supernet is not None:
            num_classes, in_channels = supernet.num_classes, supernet.in_channels
        plan = self.plan(candidate, num_classes, in_channels)
        model = self.network(plan)
        if supernet is not None:
            previous = supernet.active
            supernet.set_active(candidate)
            for name in plan.layers:
                model.get_submodule(name).load_active(supernet.net.get_submodule(name))
            supernet.set_active(previous)
            model.train(supernet.training)
        return model
