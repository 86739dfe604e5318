"""Latency span of a search space on this CPU: its smallest and largest subnets, measured.

Issue 4, acceptance 3: for ``mbv3`` on ONNX Runtime with 1 thread, the smallest subnet must run in
at most 1 ms and the largest in at least 15 ms, so that budgets of 1–10 ms bind. The smallest is
measured as defined (int8 layers exported as QDQ) and in fp32; the largest is fp32 by definition.

    .venv/bin/python experiments/space_latency_span.py [--space mbv3] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from autocomp.hardware import get_device
from autocomp.latency.generator import export_onnx
from autocomp.quant.qdq import name_nodes, quantizable_nodes, quantize_nodes
from autocomp.spaces import Candidate, get_space


def onnx_of(space, candidate: Candidate):
    """fp32 export, then its 8-bit layers quantized to QDQ (graph order = plan order)."""
    shape = (1, space.in_channels, candidate.resolution, candidate.resolution)
    model = name_nodes(export_onnx(space.build(candidate).eval(), shape))
    plan = space.plan(candidate)
    nodes = quantizable_nodes(model)
    assert len(nodes) == len(plan.layers), (len(nodes), len(plan.layers))
    chosen = [n for n, spec in zip(nodes, plan.layers.values(), strict=True) if spec.bits == 8]
    if chosen:
        model = quantize_nodes(model, chosen, input_shape=shape)
    return model, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="mbv3")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    space = get_space(args.space)
    device = get_device("cpu", threads=args.threads)
    smallest, largest = space.smallest(), space.largest()
    fp32 = dataclasses.replace(smallest, bits={k: 32 for k in smallest.bits})
    rows = []
    for label, cand in [("smallest", smallest), ("smallest-fp32", fp32), ("largest", largest)]:
        model, shape = onnx_of(space, cand)
        m = device.measure(model, shape)
        cost = space.cost(cand)
        rows.append((label, m.median_ms, m.p10_ms, m.p90_ms, cost, cand))
    print(f"device: {device.info.profile}")
    for label, med, p10, p90, cost, cand in rows:
        print(
            f"{label:14s} median {med:8.3f} ms (p10 {p10:.3f}, p90 {p90:.3f})  "
            f"MACs {cost.macs / 1e6:8.2f} M  params {cost.params / 1e6:6.3f} M  "
            f"resolution {cand.resolution}"
        )
    for label, *_, cand in rows:
        print(f"{label}: {cand.to_json()}")
    smallest_ms, largest_ms = rows[0][1], rows[2][1]
    verdict = {"smallest_ms": smallest_ms, "largest_ms": largest_ms}
    verdict["pass"] = smallest_ms <= 1.0 and largest_ms >= 15.0
    print(json.dumps(verdict))


if __name__ == "__main__":
    main()
