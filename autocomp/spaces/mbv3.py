"""MobileNetV3-style space: inverted-residual stages with elastic depth, kernel, expand and width.

Per block: kernel size, expand ratio, the keep ratio of its expanded (hidden) channels and the
bits of its expand, depthwise, squeeze-excite and project convs. Per stage: depth and output
width. Plus the input resolution and the keep ratios and bits of stem and head. The first block
of a stage has no residual (it changes width and/or stride); the others add their input. Every
block has its expand conv, even at expand ratio 1, so that all blocks share one structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from autocomp.spaces.base import Network, Param, Plan, SearchSpace, conv_out, make_divisible
from autocomp.spaces.candidate import Candidate
from autocomp.spaces.schema import ACTS, BITS, Schema
from autocomp.supernet.ops import Layer, LayerSpec, SqueezeExcite, reorder


@dataclass(frozen=True)
class MBStage:
    depth: tuple[int, ...]
    width: tuple[int, ...]
    kernel: tuple[int, ...]
    expand: tuple[int, ...]
    stride: int
    se: bool
    act: str


class MBBlock(nn.Module):
    """Expand 1x1 → depthwise k×k → optional SE → project 1x1 (+ input when not first)."""

    def __init__(self, specs: dict[str, LayerSpec], first: bool) -> None:
        super().__init__()
        self.expand = Layer(specs["expand"])
        self.dw = Layer(specs["dw"])
        self.se = (
            SqueezeExcite(specs["se.reduce"], specs["se.expand"]) if "se.reduce" in specs else None
        )
        self.project = Layer(specs["project"])
        self.residual = not first

    def forward(self, x: Tensor) -> Tensor:
        y = self.dw(self.expand(x))
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y

    def inputs(self) -> list[Layer]:
        return [self.expand]

    def reorder_channels(self) -> None:
        se = [self.se] if self.se is not None else []
        reorder([self.expand, self.dw], [self.project], se)


class MobileNetV3Space(SearchSpace):
    family = "mbv3"

    def _parse(self, config: dict[str, Any], schema: Schema) -> None:
        schema.mapping(
            config, "", ["family", "resolution", "keep_ratio", "bits", "stem", "stages", "head"]
        )
        self.resolution = schema.choices(config["resolution"], "resolution", low=1)
        self.keep = schema.choices(config["keep_ratio"], "keep_ratio", float, low=0.01, high=1)
        self.bits = schema.choices(config["bits"], "bits", allowed=BITS)
        stem = schema.mapping(config["stem"], "stem", ["width", "stride", "act"])
        self.stem_width = schema.number(stem["width"], "stem.width", low=1)
        self.stem_stride = schema.number(stem["stride"], "stem.stride", allowed=(1, 2))
        self.stem_act = schema.word(stem["act"], "stem.act", ACTS)
        self.stages = []
        fields = ["depth", "width", "kernel", "expand", "stride", "se", "act"]
        for i, raw in enumerate(schema.stages(config["stages"])):
            key = f"stages[{i}]"
            st = schema.mapping(raw, key, fields)
            kernels = schema.choices(st["kernel"], f"{key}.kernel", low=1)
            even = [k for k in kernels if k % 2 == 0]
            if even:
                raise schema.error(f"{key}.kernel", f"kernel sizes must be odd, got {even[0]}")
            self.stages.append(
                MBStage(
                    depth=schema.choices(st["depth"], f"{key}.depth", low=1),
                    width=schema.choices(st["width"], f"{key}.width", low=1),
                    kernel=kernels,
                    expand=schema.choices(st["expand"], f"{key}.expand", low=1),
                    stride=schema.number(st["stride"], f"{key}.stride", allowed=(1, 2)),
                    se=schema.flag(st["se"], f"{key}.se"),
                    act=schema.word(st["act"], f"{key}.act", ACTS),
                )
            )
        head = schema.mapping(config["head"], "head", ["width", "hidden", "act"])
        self.head_width = schema.number(head["width"], "head.width", low=1)
        self.head_hidden = schema.number(head["hidden"], "head.hidden", low=1)
        self.head_act = schema.word(head["act"], "head.act", ACTS)
        stride = self.stem_stride
        for st in self.stages:
            stride *= st.stride
        if stride > self.resolution[0]:
            raise schema.error(
                "stages",
                f"impossible strides: total stride {stride} exceeds the smallest resolution "
                f"{self.resolution[0]}",
            )

    def _params(self) -> list[Param]:
        params = [
            Param("resolution", "resolution", self.resolution),
            Param("widths", "stem", self.keep),
            Param("bits", "stem", self.bits),
        ]
        for s, st in enumerate(self.stages):
            params += [Param("arch", f"depth.{s}", st.depth), Param("arch", f"width.{s}", st.width)]
            for b in range(max(st.depth)):
                n, blk = f"stages.{s}.{b}", (s, b)
                params += [
                    Param("arch", f"kernel.{s}.{b}", st.kernel, blk),
                    Param("arch", f"expand.{s}.{b}", st.expand, blk),
                    Param("widths", f"{n}.expand", self.keep, blk),
                ]
                layers = _MB_LAYERS + _SE_LAYERS if st.se else _MB_LAYERS
                params += [Param("bits", f"{n}.{layer}", self.bits, blk) for layer in layers]
        for layer in ("head.conv", "head.fc"):
            params += [Param("widths", layer, self.keep), Param("bits", layer, self.bits)]
        params.append(Param("bits", "classifier", self.bits))
        return params

    def plan(
        self,
        candidate: Candidate,
        num_classes: int | None = None,
        in_channels: int | None = None,
        hw: tuple[int, int] | None = None,
    ) -> Plan:
        arch, keep, bits = candidate.arch, candidate.widths, candidate.bits
        h, w = hw or (candidate.resolution, candidate.resolution)
        layers: dict[str, LayerSpec] = {}

        def conv(name: str, cin: int, cout: int, k: int = 1, stride: int = 1, **kw: Any) -> None:
            nonlocal h, w
            h, w = conv_out(h, stride), conv_out(w, stride)
            kw.setdefault("bn", True)
            layers[name] = LayerSpec("conv", cin, cout, k, stride, bits=bits[name], hw=(h, w), **kw)

        cin = make_divisible(self.stem_width * keep["stem"])
        conv("stem", in_channels or self.in_channels, cin, 3, self.stem_stride, act=self.stem_act)
        for s, st in enumerate(self.stages):
            cout = arch[f"width.{s}"]
            for b in range(arch[f"depth.{s}"]):
                n = f"stages.{s}.{b}"
                hidden = make_divisible(cin * arch[f"expand.{s}.{b}"] * keep[f"{n}.expand"])
                conv(f"{n}.expand", cin, hidden, act=st.act)
                k, stride = arch[f"kernel.{s}.{b}"], st.stride if b == 0 else 1
                conv(f"{n}.dw", hidden, hidden, k, stride, depthwise=True, act=st.act)
                if st.se:
                    squeeze = make_divisible(hidden // 4)
                    se = {"bn": False, "bias": True, "hw": (1, 1)}
                    layers[f"{n}.se.reduce"] = LayerSpec(
                        "conv", hidden, squeeze, act="relu", bits=bits[f"{n}.se.reduce"], **se
                    )
                    layers[f"{n}.se.expand"] = LayerSpec(
                        "conv", squeeze, hidden, act="hsigmoid", bits=bits[f"{n}.se.expand"], **se
                    )
                conv(f"{n}.project", hidden, cout)
                cin = cout
        head = make_divisible(self.head_width * keep["head.conv"])
        conv("head.conv", cin, head, act=self.head_act)
        hidden = make_divisible(self.head_hidden * keep["head.fc"])
        layers["head.fc"] = LayerSpec(
            "linear", head, hidden, bias=True, act=self.head_act, bits=bits["head.fc"]
        )
        layers["classifier"] = LayerSpec(
            "linear", hidden, num_classes or self.num_classes, bias=True, bits=bits["classifier"]
        )
        return Plan(tuple(arch[f"depth.{s}"] for s in range(len(self.stages))), layers)

    def network(self, plan: Plan) -> Network:
        return Network(plan, MBBlock)

    def extra_nodes(self, plan: Plan) -> int:
        residual_adds = sum(depth - 1 for depth in plan.depths)
        squeeze = sum(name.endswith(".se.reduce") for name in plan.layers)  # ReduceMean, Mul
        return residual_adds + 2 * squeeze + 1  # + global pooling


_MB_LAYERS = ("expand", "dw", "project")
_SE_LAYERS = ("se.reduce", "se.expand")
