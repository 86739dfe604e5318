"""Time the kernels of a generated-model dataset again with the current micro-benchmark, keeping
each record's whole-model measurements.

When the micro-benchmark changes (here: kernels fed the model's own activations rather than
random values), this isolates what the change does to a predictor: the same models and the same
model latencies, only the kernel labels new. Each model's kernels are benchmarked twice and keep
their fastest times, as ``autocomp measure`` does. Run it on the host that measured the data:

  python experiments/relabel_kernels.py IN.jsonl OUT.jsonl
  autocomp predictor fit --data OUT.jsonl --out k.npz --cross-validate
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from autocomp.latency.dataset import (
    RECORD_VERSION,
    SESSIONS,
    append_record,
    fastest_kernel_times,
    read_records,
)
from autocomp.latency.generator import generate
from autocomp.latency.microbench import benchmark_kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="dataset from 'autocomp measure --generate'")
    ap.add_argument("out", type=Path, help="relabelled copy (resumable: done ids are skipped)")
    args = ap.parse_args()
    done = {r["id"] for r in read_records(args.out)} if args.out.exists() else set()
    todo = [r for r in read_records(args.data) if r["id"] not in done]
    for record in tqdm(todo, desc="relabelling", unit="model"):
        origin = record["source"]["generator"]  # the stream and index that rebuild the model
        sample = generate(origin["seed"], origin["index"], batch=record["input_shape"][0])
        threads = record["device"]["threads"]
        benches = [
            benchmark_kernels(sample.onnx_model, sample.input_shape, threads=threads)
            for _ in range(SESSIONS)
        ]
        kernels, times = fastest_kernel_times(benches)
        append_record(
            args.out,
            {
                **record,
                "version": RECORD_VERSION,
                "kernels": [k.to_dict() for k in kernels],
                "kernel_times_ms": times,
            },
        )


if __name__ == "__main__":
    main()
