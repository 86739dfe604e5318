"""Random CNNs for latency datasets: diverse graphs whose kernels cover what real CNNs execute.

A sample is a plain JSON config (stem, a stack of blocks, head, which layers run int8) drawn from
``numpy.random.default_rng([seed, index])``, so sample ``index`` of ``seed`` is the same model on
every machine and a dataset can be resumed or regenerated from its ids alone. Blocks cover the
kernels of mobile and server CNNs: plain/grouped/depthwise/pointwise convolutions, MBConv with
squeeze-excitation, residual basic and bottleneck blocks, ghost and dense (concat) blocks,
mixed-kernel depthwise (split/concat), pre-activation (standalone BatchNorm), pooling and
linear heads, with ReLU/ReLU6/Hardswish/SiLU/LeakyReLU activations, at resolutions 32-256.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from autocomp.quant.qdq import quantizable_nodes, quantize_nodes

ACTIVATIONS = {"relu": 0.3, "relu6": 0.1, "hswish": 0.2, "silu": 0.3, "leaky": 0.05, "none": 0.05}
BLOCKS = {
    "conv": 0.12,
    "dwsep": 0.12,
    "mbconv": 0.26,
    "basic": 0.12,
    "bottleneck": 0.14,
    "ghost": 0.07,
    "dense": 0.06,
    "mixdw": 0.05,
    "preact": 0.05,
    "pool": 0.03,
}
#: Most blocks a generated model has.
MAX_BLOCKS = 14
RESOLUTIONS = (32, 48, 64, 96, 112, 128, 160, 192, 224, 224, 224, 256)
#: Generated models are kept between these multiply-accumulate counts (cheap to measure, yet
#: spanning the tiny-to-ResNet-18 range that latency budgets live in).
MACS_RANGE = (2e6, 2e9)


@dataclass(frozen=True)
class Sample:
    """One generated model: its id, config, fp32 module and exported (possibly mixed) ONNX."""

    id: str
    config: dict[str, Any]
    input_shape: tuple[int, ...]
    onnx_model: onnx.ModelProto


def sample_id(seed: int, index: int) -> str:
    return f"gen-{seed}-{index}"


def _pick(rng: np.random.Generator, table: dict[str, float]) -> str:
    keys = list(table)
    p = np.asarray([table[k] for k in keys])
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _width(rng: np.random.Generator, c: float) -> int:
    """A channel count near ``c``: usually a multiple of 8 or 4, sometimes any number."""
    r = rng.random()
    step = 8 if r < 0.7 else 4 if r < 0.9 else 1
    return int(max(step, min(2048, round(c / step) * step)))


def random_config(rng: np.random.Generator, batch: int = 1) -> dict[str, Any]:
    """Draw a model config (unchecked size; :func:`generate` rejects out-of-range ones)."""
    res = int(rng.choice(RESOLUTIONS))
    stem_s = 1 if res <= 48 else int(rng.choice([1, 2, 2, 2]))
    stem = {
        "out": _width(rng, rng.choice([8, 16, 24, 32, 48, 64])),
        "k": int(rng.choice([3, 3, 3, 5, 7])),
        "s": stem_s,
        "act": _pick(rng, ACTIVATIONS),
        "maxpool": bool(res >= 128 and rng.random() < 0.25),
    }
    side = res // stem_s // (2 if stem["maxpool"] else 1)
    n_blocks = int(rng.integers(2, MAX_BLOCKS + 1))
    final = rng.uniform(3, 14)
    downs = int(np.clip(round(math.log2(max(side / final, 1))), 0, n_blocks))
    down_at = set(rng.choice(n_blocks, size=downs, replace=False).tolist())
    width = float(stem["out"])
    blocks = []
    for i in range(n_blocks):
        kind = _pick(rng, BLOCKS)
        s = 2 if i in down_at else 1
        if s == 2:
            width *= rng.uniform(1.3, 2.6)
        elif rng.random() < 0.25:
            width *= rng.uniform(0.6, 1.6)
        out = _width(rng, min(width, 1536))
        block = {
            "type": kind,
            "out": out,
            "k": int(rng.choice([3, 3, 3, 5, 5, 7])),
            "s": s,
            "act": _pick(rng, ACTIVATIONS),
            "expand": float(rng.choice([1, 2, 3, 4, 6])),
            "se": bool(rng.random() < 0.35),
            "gate": str(rng.choice(["sigmoid", "hsigmoid"])),
            "group_width": int(rng.choice([0, 0, 0, 8, 16, 32, 64])),  # 0: dense convolution
            "reduce": float(rng.choice([1, 2, 4])),
        }
        blocks.append(block)
    head = {
        "conv": _width(rng, rng.choice([256, 512, 960, 1280])) if rng.random() < 0.4 else 0,
        "hidden": int(rng.choice([0, 0, 0, 256, 1024])),
        "classes": int(rng.choice([10, 100, 1000])),
        "act": _pick(rng, ACTIVATIONS),
    }
    r = rng.random()
    int8 = 0.0 if r < 0.35 else 1.0 if r < 0.5 else float(rng.uniform(0.2, 0.8))
    return {
        "batch": int(batch),
        "resolution": res,
        "stem": stem,
        "blocks": blocks,
        "head": head,
        "int8_fraction": int8,
    }


def _act(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU(),
        "relu6": nn.ReLU6(),
        "hswish": nn.Hardswish(),
        "silu": nn.SiLU(),
        "leaky": nn.LeakyReLU(0.1),
        "none": nn.Identity(),
    }[name]


def _cba(cin: int, cout: int, k: int, s: int = 1, groups: int = 1, act: str = "none") -> nn.Module:
    """Convolution, BatchNorm (folded away at export), activation."""
    conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), _act(act))


def _divisible(c: float) -> int:
    """Round a derived width to a multiple of 8, as timm's make_divisible does."""
    return max(8, int(c + 4) // 8 * 8)


def _groups(cin: int, cout: int, group_width: int) -> int:
    if group_width <= 0:
        return 1
    g = max(1, min(cin, cout) // group_width)
    while cin % g or cout % g:
        g -= 1
    return g


class _SE(nn.Module):
    def __init__(self, c: int, act: str, gate: str):
        super().__init__()
        mid = max(8, c // 4)
        self.reduce = nn.Conv2d(c, mid, 1)
        self.act = _act("relu" if act == "none" else act)
        self.expand = nn.Conv2d(mid, c, 1)
        self.gate = nn.Sigmoid() if gate == "sigmoid" else nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(w))))


class _Residual(nn.Module):
    """body(x) + shortcut(x), then an activation (the ResNet/MBConv pattern)."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None, act: str = "none"):
        super().__init__()
        self.body, self.shortcut, self.act = body, shortcut, _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.body(x) + skip)


class _Concat(nn.Module):
    """cat of branches along channels (ghost, dense and mixed-kernel blocks)."""

    def __init__(self, branches: list[nn.Module], keep_input: bool = False, split: bool = False):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.keep_input, self.split = keep_input, split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split:
            n = len(self.branches)
            sizes = [x.shape[1] // n] * (n - 1) + [x.shape[1] - x.shape[1] // n * (n - 1)]
            parts = torch.split(x, sizes, dim=1)
            return torch.cat([b(p) for b, p in zip(self.branches, parts, strict=True)], 1)
        outs = [b(x) for b in self.branches]
        return torch.cat([x, *outs] if self.keep_input else outs, 1)


class _Ghost(nn.Module):
    def __init__(self, cin: int, cout: int, s: int, act: str):
        super().__init__()
        half = max(1, cout // 2)
        self.primary = _cba(cin, half, 1, s, act=act)
        self.cheap = _cba(half, cout - half, 3, groups=math.gcd(half, cout - half), act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1)


def _block(cin: int, b: dict[str, Any]) -> tuple[nn.Module, int]:
    kind, cout, k, s, act = b["type"], b["out"], b["k"], b["s"], b["act"]
    if kind == "conv":
        return _cba(cin, cout, k, s, _groups(cin, cout, b["group_width"]), act), cout
    if kind == "dwsep":
        body = nn.Sequential(_cba(cin, cin, k, s, cin, act), _cba(cin, cout, 1))
        if b["se"]:
            body.insert(1, _SE(cin, act, b["gate"]))
        return (_Residual(body, None) if s == 1 and cin == cout else body), cout
    if kind == "mbconv":
        mid = _divisible(cin * b["expand"])
        layers: list[nn.Module] = [] if mid == cin else [_cba(cin, mid, 1, act=act)]
        layers.append(_cba(mid, mid, k, s, mid, act))
        if b["se"]:
            layers.append(_SE(mid, act, b["gate"]))
        layers.append(_cba(mid, cout, 1))
        body = nn.Sequential(*layers)
        return (_Residual(body, None) if s == 1 and cin == cout else body), cout
    if kind == "basic":
        body = nn.Sequential(_cba(cin, cout, 3, s, act=act), _cba(cout, cout, 3))
        short = None if s == 1 and cin == cout else _cba(cin, cout, 1, s)
        return _Residual(body, short, act), cout
    if kind == "bottleneck":
        mid = _divisible(cout / b["reduce"])
        layers = [
            _cba(cin, mid, 1, act=act),
            _cba(mid, mid, k, s, _groups(mid, mid, b["group_width"]), act),
        ]
        if b["se"]:
            layers.append(_SE(mid, act, b["gate"]))
        layers.append(_cba(mid, cout, 1))
        short = None if s == 1 and cin == cout else _cba(cin, cout, 1, s)
        return _Residual(nn.Sequential(*layers), short, act), cout
    if kind == "ghost":
        return _Ghost(cin, cout, s, act), cout
    if kind == "dense":
        growth = _divisible(cout / 4)
        branch = nn.Sequential(
            nn.BatchNorm2d(cin),
            _act(act),
            _cba(cin, 4 * growth, 1, act=act),
            nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False),
        )
        dense: nn.Module = _Concat([branch], keep_input=True)
        if s == 2:  # DenseNet transition: BN, act, 1x1 conv, 2x2 average pool
            c = cin + growth
            dense = nn.Sequential(
                dense,
                nn.BatchNorm2d(c),
                _act(act),
                nn.Conv2d(c, cout, 1, bias=False),
                nn.AvgPool2d(2, 2),
            )
            return dense, cout
        return dense, cin + growth
    if kind == "mixdw":
        n = 2 if cin < 6 else 3
        sizes = [cin // n] * (n - 1) + [cin - cin // n * (n - 1)]
        branches = [
            nn.Conv2d(c, c, kk, s, kk // 2, groups=c, bias=False)
            for c, kk in zip(sizes, (3, 5, 7), strict=False)
        ]
        mix = nn.Sequential(_Concat(branches, split=True), nn.BatchNorm2d(cin), _act(act))
        return nn.Sequential(mix, _cba(cin, cout, 1)), cout
    if kind == "pool":
        if s == 2 and b["k"] == 3:
            return nn.MaxPool2d(3, 2, 1), cin
        return (nn.AvgPool2d(2, 2) if s == 2 else nn.MaxPool2d(3, 1, 1)), cin
    if kind == "preact":
        body = nn.Sequential(nn.BatchNorm2d(cin), _act(act), nn.Conv2d(cin, cout, k, s, k // 2))
        return body, cout
    raise ValueError(f"unknown block type {kind!r}")


def build_model(config: dict[str, Any]) -> nn.Module:
    """The fp32 torch module a config describes (eval mode, default initialisation)."""
    st = config["stem"]
    layers: list[nn.Module] = [_cba(3, st["out"], st["k"], st["s"], act=st["act"])]
    if st["maxpool"]:
        layers.append(nn.MaxPool2d(3, 2, 1))
    c = st["out"]
    for b in config["blocks"]:
        block, c = _block(c, b)
        layers.append(block)
    h = config["head"]
    if h["conv"]:
        layers.append(_cba(c, h["conv"], 1, act=h["act"]))
        c = h["conv"]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if h["hidden"]:
        layers += [nn.Linear(c, h["hidden"]), _act(h["act"])]
        c = h["hidden"]
    layers.append(nn.Linear(c, h["classes"]))
    return trained_like(nn.Sequential(*layers).eval())


def trained_like(model: nn.Module) -> nn.Module:
    """Give ``model``'s BatchNorms trained-like, distinct parameters and statistics, in place.

    Fresh BatchNorms fold into equal biases, which the ONNX exporter shares between layers, and
    ORT then leaves such int8 convolutions unfused: a network measured that way runs up to 60%
    slower than the same network trained, so it is no sample of deployed latency."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of convolutions and linear layers for one forward pass."""
    total = 0

    def hook(m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total += out.numel() * k
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        with torch.no_grad():
            module(torch.zeros(input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return total


def export_onnx(module: nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """fp32 ONNX (opset 17) of ``module`` with a static input named ``input``.

    TorchScript export is used because it is ~10x faster than the dynamo exporter, which matters
    for hundreds of generated models; ONNX Runtime's fusions make both graphs run the same kernels.
    """
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.zeros(input_shape),),
            buf,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            do_constant_folding=True,
        )
    return onnx.load_model_from_string(buf.getvalue())


def mixed_precision(
    model: onnx.ModelProto, fraction: float, rng: np.random.Generator, input_shape: tuple[int, ...]
) -> tuple[onnx.ModelProto, list[str]]:
    """Quantize a random ``fraction`` of the quantizable layers to int8 (QDQ)."""
    names = quantizable_nodes(model)
    chosen = [n for n in names if rng.random() < fraction]
    if not chosen:
        return model, []
    return quantize_nodes(model, chosen, input_shape=input_shape, seed=0), chosen


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: on a busy small machine, OpenMP threads that wait for each other
    make building and exporting a model 30-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def generate(seed: int, index: int, batch: int = 1) -> Sample:
    """Sample ``index`` of the stream ``seed``: a valid model within :data:`MACS_RANGE`."""
    with one_torch_thread():
        return _generate(seed, index, batch)


def _generate(seed: int, index: int, batch: int) -> Sample:
    rng = np.random.default_rng([seed, index])
    torch.manual_seed(int(rng.integers(2**31)))
    while True:
        config = random_config(rng, batch)
        shape = (batch, 3, config["resolution"], config["resolution"])
        module = build_model(config)
        macs = count_macs(module, (1, *shape[1:]))
        if MACS_RANGE[0] <= macs <= MACS_RANGE[1]:
            break
    model = export_onnx(module, shape)
    model, int8 = mixed_precision(model, config["int8_fraction"], rng, shape)
    config = {**config, "macs": macs, "int8_nodes": int8}
    return Sample(sample_id(seed, index), config, shape, model)


def encode_config(config: dict[str, Any]) -> np.ndarray:
    """Fixed-length vector of a generator config, for arch-level predictors on generated data."""
    block_types, acts = list(BLOCKS), list(ACTIVATIONS)
    st, head = config["stem"], config["head"]
    n_int8 = len(config.get("int8_nodes", []))
    row = [
        config["batch"],
        config["resolution"],
        st["out"],
        st["k"],
        st["s"],
        st["maxpool"],
        acts.index(st["act"]),
        head["conv"],
        head["hidden"],
        head["classes"],
        config["int8_fraction"],
        n_int8,
        len(config["blocks"]),
    ]
    for i in range(MAX_BLOCKS):
        if i < len(config["blocks"]):
            b = config["blocks"][i]
            row += [
                block_types.index(b["type"]) + 1,
                b["out"],
                b["k"],
                b["s"],
                acts.index(b["act"]),
                b["expand"],
                b["se"],
                b["group_width"],
                b["reduce"],
            ]
        else:
            row += [0] * 9
    return np.asarray(row, dtype=np.float64)
