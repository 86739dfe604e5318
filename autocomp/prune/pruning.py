"""Dependency-aware channel removal from an existing model, with Torch-Pruning's dependency graph.

Removing output channels of one layer forces the removal of the matching channels everywhere they
flow: the BatchNorm after it, the input channels of every consumer, the other branch of a residual
add, the slices of a concatenation, a depthwise convolution's in *and* out channels. Torch-Pruning
traces the model once and finds these coupled sets (its *groups*); here each group is one
prunable unit, named by its root layer, with one keep ratio.

Which channels go is decided once, on the model as given, by an importance criterion (``l1``
magnitude, first-order ``taylor`` from a few training batches, or ``fpgm``, the geometric median
distance), summed over every layer of the group; a keep ratio then removes the least important
ones, so the pruned network of a policy is a deterministic function of the policy. Grouped (not
depthwise) convolutions need the same in-group channel offsets removed from every group of
channels; such groups are pruned chunk-wise. Output layers (the classifier) are never pruned.

What cannot be pruned safely is not pruned, and the reason is kept (``ModelPruner.skipped``): a
group whose removal breaks the forward pass, or a whole model the tracer cannot follow (then
``ModelPruner.unsupported`` names the layer and the caller falls back to a bits-only search).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from autocomp.errors import AutocompError
from autocomp.hardware.onnx_io import one_line

#: Importance criteria: name → what it measures.
IMPORTANCES = {
    "l1": "L1 norm of each channel's weights, summed over the coupled layers",
    "taylor": "first-order Taylor estimate |w · dL/dw| of the loss change (a few training batches)",
    "fpgm": "distance to the geometric median of the layer's filters (FPGM)",
}

#: Channel counts are rounded to multiples of this (when the group has a multiple of it and at
#: least two): ONNX Runtime's CPU convolutions work on blocks of 8 or 16 channels.
CHANNEL_MULTIPLE = 8


class PruningUnsupported(AutocompError):
    """The model cannot be channel-pruned (the message names the layer and why)."""


@dataclass(frozen=True)
class ChannelGroup:
    """Channels coupled across layers, removed together.

    ``name`` is the root layer's module path (the group removes its output channels and their
    every use); ``channels`` their count; ``chunks`` > 1 when grouped convolutions take part, so
    that the same offsets go from each of the ``chunks`` consecutive runs of channels; ``order``
    lists root channels (or, with chunks, in-chunk offsets) least important first; ``layers``
    the conv/linear/norm layers whose channels the group changes.
    """

    name: str
    channels: int
    chunks: int
    order: tuple[int, ...]
    layers: tuple[str, ...]

    def keep(self, ratio: float) -> int:
        """Channels kept at keep ``ratio`` (at least one per chunk; rounded to multiples of
        :data:`CHANNEL_MULTIPLE` where the group allows)."""
        if not 0 < ratio <= 1:
            raise AutocompError(f"keep ratio of group {self.name!r} must be in (0, 1], got {ratio}")
        if self.chunks > 1:
            per = self.channels // self.chunks
            return self.chunks * min(per, max(1, int(ratio * per + 0.5)))
        m = CHANNEL_MULTIPLE
        if self.channels % m == 0 and self.channels >= 2 * m:
            return min(self.channels, max(m, int(ratio * self.channels / m + 0.5) * m))
        return min(self.channels, max(1, int(ratio * self.channels + 0.5)))

    def removed(self, ratio: float) -> list[int]:
        """Root channel indices removed at keep ``ratio``, sorted."""
        if self.chunks > 1:
            per = self.channels // self.chunks
            drop = per - self.keep(ratio) // self.chunks
            offsets = self.order[:drop]
            return sorted(c * per + o for c in range(self.chunks) for o in offsets)
        return sorted(self.order[: self.channels - self.keep(ratio)])


class ModelPruner:
    """Finds the prunable channel groups of ``model`` and builds pruned copies of it.

    ``example_input`` is one batch the model accepts (its shape is the deployed one).
    ``importance`` is a key of :data:`IMPORTANCES`; ``taylor`` needs ``gradient_batches``
    ((images, labels) pairs from the training split). ``ignored_layers`` are module paths whose
    output channels must stay (the classifier is always kept). Every group is checked by running
    the model pruned at each of ``check_ratios`` (the keep ratios that will be asked for).
    The model is never modified.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor,
        *,
        importance: str = "l1",
        ignored_layers: Sequence[str] = (),
        gradient_batches: Iterable[tuple[Tensor, Tensor]] | None = None,
        check_ratios: Sequence[float] = (0.25, 0.5, 0.75),
    ) -> None:
        if importance not in IMPORTANCES:
            raise AutocompError(
                f"unknown importance criterion {importance!r}; use one of {', '.join(IMPORTANCES)}"
            )
        self.model = model
        self.example_input = example_input
        self.importance = importance
        self.groups: list[ChannelGroup] = []
        self.skipped: dict[str, str] = {}  # group root → why it is not pruned
        self.unsupported: str | None = None  # why nothing can be pruned, naming the layer
        self.output_layers, self.output_shape = output_layers(model, example_input)
        self.bn_after: dict[str, str] = {}  # conv → the BatchNorm that alone consumes its output
        names = dict(model.named_modules())
        unknown = [n for n in ignored_layers if n not in names]
        if unknown:
            raise AutocompError(f"the model has no layer {unknown[0]!r} to keep unpruned")
        try:
            self._analyse([*self.output_layers, *ignored_layers], gradient_batches)
            for ratio in sorted({float(r) for r in check_ratios if r < 1}):
                self._check_groups(ratio)
        except PruningUnsupported as err:
            self.groups, self.unsupported = [], str(err)

    # ---------------------------------------------------------------------------- analysis
    def _analyse(
        self, keep: Sequence[str], gradient_batches: Iterable[tuple[Tensor, Tensor]] | None
    ) -> None:
        reference = copy.deepcopy(self.model).eval()
        if self.importance == "taylor":
            _accumulate_gradients(reference, gradient_batches)
        graph = _graph(reference, self.example_input)
        modules = dict(reference.named_modules())
        names = {m: n for n, m in modules.items()}
        missing = [
            n
            for n, m in modules.items()
            if isinstance(m, nn.modules.conv._ConvNd | nn.Linear | _BatchNorm)
            and m not in graph.module2node
        ]
        if missing:
            raise PruningUnsupported(
                f"layer {missing[0]!r} never ran while tracing the model (dynamic control flow or "
                "an unused branch), so its channels cannot be kept consistent"
            )
        self.bn_after = _bn_pairs(graph, reference, self.example_input)
        ignored = [modules[n] for n in keep]
        scorer = _importance(self.importance)
        roots = (nn.modules.conv._ConvNd, nn.Linear)
        with _quiet():
            groups = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=roots))
        for group in groups:
            root = group[0].dep.target.module
            name = names[root]
            n = len(group[0].idxs)
            if n < 2:
                continue
            layers = tuple(
                dict.fromkeys(
                    names[item.dep.target.module]
                    for item in group
                    if isinstance(item.dep.target.module, nn.Module)
                    and item.dep.target.module in names
                    and any(True for _ in item.dep.target.module.parameters(recurse=False))
                )
            )
            chunks, why = _chunking(graph, group, root, n)
            if why:
                self.skipped[name] = why
                continue
            with _quiet(), torch.no_grad():
                score = scorer(group)
            if score is None or not torch.isfinite(score).all():
                score = torch.arange(n, dtype=torch.float32)  # nothing to rank by: keep the first
            score = score.float().reshape(chunks, n // chunks).sum(0)
            order = tuple(int(i) for i in torch.argsort(score, stable=True))
            self.groups.append(ChannelGroup(name, n, chunks, order, layers))

    def _check_groups(self, ratio: float) -> None:
        """Prune every group at once to ``ratio`` and run the model; on failure find the groups
        responsible (one at a time) and skip them, saying why."""
        if not self.groups or _runs(self, {g.name: ratio for g in self.groups}) is None:
            return
        for g in list(self.groups):
            error = _runs(self, {g.name: ratio})
            if error is not None:
                self.groups.remove(g)
                self.skipped[g.name] = f"keeping {ratio:g} of its channels breaks it: {error}"
        error = _runs(self, {g.name: ratio for g in self.groups})
        if error is not None:  # each alone is fine, together not: prune none
            for g in self.groups:
                self.skipped[g.name] = f"pruning all groups together breaks the model: {error}"
            self.groups = []

    # ------------------------------------------------------------------------------ pruning
    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise AutocompError(f"no prunable channel group {name!r}")

    def prune(self, widths: Mapping[str, float]) -> nn.Module:
        """A pruned copy of the model: each group (by root name) keeps ``widths[name]`` of its
        channels, the most important ones; groups not named keep all."""
        unknown = set(widths) - {g.name for g in self.groups}
        if unknown:
            raise AutocompError(f"no prunable channel group {sorted(unknown)[0]!r}")
        model = copy.deepcopy(self.model)
        plan = [(g, g.removed(widths.get(g.name, 1.0))) for g in self.groups]
        plan = [(g, idxs) for g, idxs in plan if idxs]
        if not plan:
            return model
        was_training = model.training
        graph = _graph(model, self.example_input)
        modules = dict(model.named_modules())
        for g, idxs in plan:
            root = modules[g.name]
            handler = graph.get_pruner_of_module(root).prune_out_channels
            with _quiet():
                graph.get_pruning_group(root, handler, idxs).prune()
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
        return model


# ------------------------------------------------------------------------------- helpers


@contextmanager
def _quiet() -> Iterator[None]:
    """Torch-Pruning warns about every unwrapped parameter it handles; we report differently."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _graph(model: nn.Module, example_input: Tensor):
    """Torch-Pruning's dependency graph of ``model`` (traced in eval mode; the mode is kept)."""
    import torch_pruning as tp

    was_training = model.training
    try:
        with _quiet(), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_input, verbose=False)
    except Exception as err:
        layer = failing_layer(model, example_input)
        where = f" at layer {layer!r}" if layer else ""
        raise PruningUnsupported(
            f"the dependency tracer cannot follow the model{where}: {one_line(err)}"
        ) from None
    finally:
        model.train(was_training)


def failing_layer(model: nn.Module, example_input: Tensor) -> str | None:
    """The innermost module that was running when a forward pass of ``model`` failed."""
    names = {m: n for n, m in model.named_modules() if n}
    stack: list[str] = []
    last: list[str | None] = [None]

    def enter(module: nn.Module, _args: object) -> None:
        stack.append(names[module])

    def leave(module: nn.Module, _args: object, _out: object) -> None:
        stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in names]
    handles += [m.register_forward_hook(leave) for m in names]
    try:
        with torch.no_grad():
            model(example_input)
    except Exception:
        last[0] = stack[-1] if stack else None
    finally:
        for h in handles:
            h.remove()
    return last[0]


def output_layers(model: nn.Module, example_input: Tensor) -> tuple[list[str], tuple[int, ...]]:
    """Layers whose output channels are the model's outputs (the classifier: timm's
    ``get_classifier``, else the last conv/linear layer to run), and the output's shape."""
    found: list[str] = []
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:
            head = None
        if isinstance(head, nn.Module):
            names = {m: n for n, m in model.named_modules()}
            found += [names[m] for m in head.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(names[mod]))
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_input)
    except Exception as err:
        layer = failing_layer(model, example_input)
        where = f" (in layer {layer!r})" if layer else ""
        shape = tuple(example_input.shape)
        raise AutocompError(f"the model fails on a {shape} input{where}: {one_line(err)}") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if not isinstance(out, Tensor):
        raise AutocompError(
            f"the model returns {type(out).__name__}, not a tensor of logits; wrap it so that "
            "it returns the logits"
        )
    if order:
        found.append(order[-1])
    return list(dict.fromkeys(found)), tuple(out.shape)


def _importance(name: str):
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.FPGMImportance(p=2)


def _accumulate_gradients(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]] | None
) -> None:
    """Loss gradients of ``model`` (eval mode: the deployed function) summed over ``batches``."""
    batches = list(batches or [])
    if not batches:
        raise AutocompError("the taylor importance needs training batches (images, labels)")
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()


def _is_grouped(module: nn.Module) -> bool:
    """A grouped convolution that is not depthwise (Torch-Pruning's depthwise: groups == out)."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.groups != module.out_channels
    )


def _chunking(graph, group, root: nn.Module, n: int) -> tuple[int, str | None]:
    """How many equal chunks the group's channels must be pruned alike in (grouped convs), or
    why the group cannot be pruned."""
    convs = [item.dep.target.module for item in group]
    counts = [m.groups for m in convs if _is_grouped(m)]
    if not counts:
        return 1, None
    chunks = math.lcm(*counts)
    name = graph._module2name.get(root, "?")
    if n % chunks or n // chunks < 2:
        return 1, f"its {n} channels do not split into {chunks} groups of ≥ 2 (grouped conv)"
    per = n // chunks
    probe = sorted(c * per + o for c in range(chunks) for o in {0, per // 2})
    handler = graph.get_pruner_of_module(root).prune_out_channels
    with _quiet():
        trial = graph.get_pruning_group(root, handler, probe)
    for item in trial:
        conv = item.dep.target.module
        if not _is_grouped(conv):
            continue
        total = conv.in_channels if graph.is_in_channel_pruning_fn(item.dep.handler) else None
        total = total or conv.out_channels
        size = total // conv.groups
        runs: dict[int, set[int]] = {}
        for i in item.idxs:
            runs.setdefault(i // size, set()).add(i % size)
        if len(runs) != conv.groups or len({frozenset(v) for v in runs.values()}) != 1:
            layer = graph._module2name.get(conv, "?")
            return 1, (
                f"its channels reach grouped conv {layer!r} in an order that would break its "
                f"groups (root {name!r})"
            )
    return chunks, None


def _bn_pairs(graph, model: nn.Module, example_input: Tensor) -> dict[str, str]:
    """conv → BatchNorm pairs where the BatchNorm reads the conv's output and nothing else does
    (so the BatchNorm can be folded into the conv): the tensor is matched by forward hooks, the
    single consumer by the dependency graph."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, str] = {}
    pairs: dict[str, str] = {}
    alive: list[Tensor] = []  # keeps every recorded tensor alive, so that ids are not reused

    def conv_hook(module: nn.Module, _inputs: Any, output: Tensor) -> None:
        alive.append(output)
        produced[id(output)] = names[module]

    def bn_hook(module: nn.Module, inputs: Any) -> None:
        alive.append(inputs[0])
        conv = produced.get(id(inputs[0]))
        if conv is not None:
            pairs[conv] = names[module]

    hooks = [
        m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)
    ]
    hooks += [
        m.register_forward_pre_hook(bn_hook) for m in model.modules() if isinstance(m, _BatchNorm)
    ]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    single = {
        names[m] for m, node in graph.module2node.items() if m in names and len(node.outputs) == 1
    }
    return {conv: bn for conv, bn in pairs.items() if conv in single}


def _runs(pruner: ModelPruner, widths: Mapping[str, float]) -> str | None:
    """None if the model pruned to ``widths`` runs and keeps its output shape, else why not."""
    try:
        model = pruner.prune(widths).eval()
        with torch.no_grad():
            after = model(pruner.example_input)
    except Exception as err:
        return one_line(err)
    before = pruner.output_shape
    if isinstance(after, Tensor) and tuple(after.shape) != before:
        return f"the output shape changes from {before} to {tuple(after.shape)}"
    return None
