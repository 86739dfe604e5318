"""Exactness of the built-in spaces on random candidates (issue 4, acceptance 1 and 2).

For each space and N random candidates (the smallest and largest included) with mixed int8/fp32
layers, on a supernet whose BN statistics and quantizer ranges have seen data, fake quantization
on, eval mode:
  * max |logits(build(c, supernet)) - logits(supernet with c active)|           (≤ 1e-4)
  * analytic MACs/params vs FlopCounterMode / sum(p.numel()) of the built model  (equal)
  * modeled size vs the exported ONNX file: fp32 twin of c (TorchScript export), and c itself
    with its int8 layers quantized by ONNX Runtime's quantize_static (QDQ)      (within 5%)

    .venv/bin/python experiments/space_exactness.py [--n 50] [--size-n 10] [--spaces mbv3 resnet]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from autocomp.latency.generator import export_onnx
from autocomp.quant.qdq import name_nodes, quantizable_nodes, quantize_nodes
from autocomp.spaces import get_space


def calibrated_supernet(space, steps: int = 8, seed: int = 0):
    """BN statistics and int8 ranges accumulated over random int8 subnets, as after QAT."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = space.supernet().set_quantization(True).train()
    with torch.no_grad():
        for step in range(steps):
            c = space.largest() if step == 0 else space.sample(rng)
            c = dataclasses.replace(c, bits=dict.fromkeys(c.bits, 8))
            net.set_active(c)(torch.randn(8, space.in_channels, c.resolution, c.resolution))
    return net.eval()


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Distinct weights and BN stats, so the exporter cannot share equal folded biases."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return model


def exported_size(space, c) -> int:
    shape = (1, space.in_channels, c.resolution, c.resolution)
    model = name_nodes(export_onnx(trained_like(space.build(c)), shape))
    specs = list(space.plan(c).layers.values())
    nodes = quantizable_nodes(model)
    chosen = [n for n, s in zip(nodes, specs, strict=True) if s.bits == 8]
    if chosen:
        model = quantize_nodes(model, chosen, input_shape=shape)
    return len(model.SerializeToString())


def run(name: str, n: int, size_n: int) -> None:
    space = get_space(name)
    net = calibrated_supernet(space)
    rng = np.random.default_rng(1)
    pool = [space.smallest(), space.largest(), *(space.sample(rng) for _ in range(n - 2))]
    worst, cost_ok, size_err = 0.0, 0, {"fp32": [], "mixed": []}
    start = time.perf_counter()
    for i, c in enumerate(pool):
        x = torch.randn(2, space.in_channels, c.resolution, c.resolution)
        with torch.no_grad():
            expected = net.set_active(c)(x)
            model = space.build(c, net)
            worst = max(worst, (model(x) - expected).abs().max().item())
            with FlopCounterMode(display=False) as counter:
                model(x[:1])
        cost = space.cost(c)
        params = sum(p.numel() for p in model.parameters())
        cost_ok += cost.flops == counter.get_total_flops() and cost.params == params
        if i < size_n:
            fp32 = dataclasses.replace(c, bits=dict.fromkeys(c.bits, 32))
            for label, cand in (("fp32", fp32), ("mixed", c)):
                size_err[label].append(space.cost(cand).size_bytes / exported_size(space, cand) - 1)
    int8_layers = sum(sum(b == 8 for b in c.bits.values()) for c in pool)
    print(
        f"{name}: {n} candidates ({int8_layers} int8 layers in all), "
        f"{time.perf_counter() - start:.0f} s\n"
        f"  max |logits diff| extracted vs supernet: {worst:.2e}\n"
        f"  MACs and params exact: {cost_ok}/{n}"
    )
    for label, errs in size_err.items():
        e = np.asarray(errs)
        print(
            f"  size vs exported ONNX ({label}, {len(e)} candidates): "
            f"error {e.min():+.2%} .. {e.max():+.2%}, max |error| {np.abs(e).max():.2%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--size-n", type=int, default=10)
    parser.add_argument("--spaces", nargs="+", default=["mbv3", "resnet"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # quantize_static's advice on pre-processing
    for name in args.spaces:
        run(name, args.n, args.size_n)


if __name__ == "__main__":
    main()
