"""ResNet-style space: basic or bottleneck stages with elastic depth, width and block width.

Per block: its width ratio (inner channels = stage width × ratio, OFA's "expand ratio" for
ResNets), the keep ratios of its inner convs and the bits of all its convs. Per stage: depth and
output width. Plus the input resolution and the stem's keep ratio and bits. The first block of a
stage has a 1x1 projection shortcut (width and/or stride change); the others add their input.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from autocomp.spaces.base import Network, Param, Plan, SearchSpace, conv_out, make_divisible
from autocomp.spaces.candidate import Candidate
from autocomp.spaces.schema import BITS, Schema
from autocomp.supernet.ops import Layer, LayerSpec, reorder

#: Per block kind: its convs in order (kernel, whether its width is free), stride on which conv.
BLOCKS = {
    "basic": {"convs": (("conv1", 3, True), ("conv2", 3, False)), "stride_on": "conv1"},
    "bottleneck": {
        "convs": (("conv1", 1, True), ("conv2", 3, True), ("conv3", 1, False)),
        "stride_on": "conv2",
    },
}


@dataclass(frozen=True)
class ResStage:
    depth: tuple[int, ...]
    width: tuple[int, ...]
    ratio: tuple[float, ...]
    stride: int


class ResBlock(nn.Module):
    """Convs of a basic/bottleneck block, shortcut (projection when first), ReLU after the add."""

    def __init__(self, specs: dict[str, LayerSpec], first: bool) -> None:
        super().__init__()
        names = [n for n in ("conv1", "conv2", "conv3") if n in specs]
        for name in names:
            self.add_module(name, Layer(specs[name]))
        self.convs = names
        self.shortcut = Layer(specs["shortcut"]) if first else None
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = x
        for name in self.convs:
            y = getattr(self, name)(y)
        return self.relu(y + (x if self.shortcut is None else self.shortcut(x)))

    def inputs(self) -> list[Layer]:
        return [self.conv1] + ([self.shortcut] if self.shortcut is not None else [])

    def reorder_channels(self) -> None:
        layers = [getattr(self, n) for n in self.convs]
        for producer, consumer in itertools.pairwise(layers):
            reorder([producer], [consumer])


class ResNetSpace(SearchSpace):
    family = "resnet"

    def _parse(self, config: dict[str, Any], schema: Schema) -> None:
        schema.mapping(
            config, "", ["family", "block", "resolution", "keep_ratio", "bits", "stem", "stages"]
        )
        self.block = schema.word(config["block"], "block", BLOCKS)
        self.resolution = schema.choices(config["resolution"], "resolution", low=1)
        self.keep = schema.choices(config["keep_ratio"], "keep_ratio", float, low=0.01, high=1)
        self.bits = schema.choices(config["bits"], "bits", allowed=BITS)
        stem = schema.mapping(config["stem"], "stem", ["width", "kernel", "stride"])
        self.stem_width = schema.number(stem["width"], "stem.width", low=1)
        self.stem_kernel = schema.number(stem["kernel"], "stem.kernel", allowed=(1, 3, 5, 7))
        self.stem_stride = schema.number(stem["stride"], "stem.stride", allowed=(1, 2))
        self.stages = []
        for i, raw in enumerate(schema.stages(config["stages"])):
            key = f"stages[{i}]"
            st = schema.mapping(raw, key, ["depth", "width", "ratio", "stride"])
            self.stages.append(
                ResStage(
                    depth=schema.choices(st["depth"], f"{key}.depth", low=1),
                    width=schema.choices(st["width"], f"{key}.width", low=1),
                    ratio=schema.choices(st["ratio"], f"{key}.ratio", float, low=0.01),
                    stride=schema.number(st["stride"], f"{key}.stride", allowed=(1, 2)),
                )
            )
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
        convs = BLOCKS[self.block]["convs"]
        params = [
            Param("resolution", "resolution", self.resolution),
            Param("widths", "stem", self.keep),
            Param("bits", "stem", self.bits),
        ]
        for s, st in enumerate(self.stages):
            params += [Param("arch", f"depth.{s}", st.depth), Param("arch", f"width.{s}", st.width)]
            for b in range(max(st.depth)):
                n, blk = f"stages.{s}.{b}", (s, b)
                params.append(Param("arch", f"ratio.{s}.{b}", st.ratio, blk))
                params += [
                    Param("widths", f"{n}.{c}", self.keep, blk) for c, _, free in convs if free
                ]
                params += [Param("bits", f"{n}.{c}", self.bits, blk) for c, _, _ in convs]
                if b == 0:
                    params.append(Param("bits", f"{n}.shortcut", self.bits, blk))
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
        kind = BLOCKS[self.block]
        layers: dict[str, LayerSpec] = {}

        def conv(
            name: str, cin: int, cout: int, k: int, stride: int, hw: tuple[int, int], act: str
        ) -> None:
            layers[name] = LayerSpec(
                "conv", cin, cout, k, stride, bn=True, act=act, bits=bits[name], hw=hw
            )

        h, w = conv_out(h, self.stem_stride), conv_out(w, self.stem_stride)
        cin = make_divisible(self.stem_width * keep["stem"])
        conv(
            "stem",
            in_channels or self.in_channels,
            cin,
            self.stem_kernel,
            self.stem_stride,
            (h, w),
            "relu",
        )
        for s, st in enumerate(self.stages):
            cout = arch[f"width.{s}"]
            for b in range(arch[f"depth.{s}"]):
                n = f"stages.{s}.{b}"
                stride = st.stride if b == 0 else 1
                out_hw = (conv_out(h, stride), conv_out(w, stride))
                inner = cout * arch[f"ratio.{s}.{b}"]
                prev, hw_now = cin, (h, w)
                for name, k, free in kind["convs"]:
                    strided = name == kind["stride_on"]
                    if strided:
                        hw_now = out_hw
                    width = make_divisible(inner * keep[f"{n}.{name}"]) if free else cout
                    conv(
                        f"{n}.{name}",
                        prev,
                        width,
                        k,
                        stride if strided else 1,
                        hw_now,
                        "relu" if free else "none",
                    )
                    prev = width
                if b == 0:
                    conv(f"{n}.shortcut", cin, cout, 1, stride, out_hw, "none")
                cin, (h, w) = cout, out_hw
        layers["classifier"] = LayerSpec(
            "linear", cin, num_classes or self.num_classes, bias=True, bits=bits["classifier"]
        )
        return Plan(tuple(arch[f"depth.{s}"] for s in range(len(self.stages))), layers)

    def network(self, plan: Plan) -> Network:
        return Network(plan, ResBlock)

    def extra_nodes(self, plan: Plan) -> int:
        return 2 * sum(plan.depths) + 1  # Add and ReLU per block, global pooling
