"""Does this host run at one speed? The check behind issue 2's repeatability failures.

Times a few timm CNNs at 224x224 (random weights, one intra-op thread, thread CPU clock, as the
``cpu`` device does) round-robin in one process for ``--seconds``, one run of each in turn, and
prints each model's median in every window of ``--window`` seconds over its fastest window's,
then

* how far the windows spread (max/min, coefficient of variation): a host at one speed stays
  within a few percent, and 5 processes of ``autocomp measure`` then agree within +-5%;
* how the models move together: the correlation of the log window medians and the spread of
  the ratio between two models. If every model slows down alike, the slowdown is the host's
  speed (clock or a neighbour's load), not anything a measuring method inside the VM can undo.

Run from the repository root (the models are exported once into a temporary folder):

    python experiments/host_drift.py                   # 5 minutes
    python experiments/host_drift.py --seconds 60 --models resnet18 regnetx_002
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from measure_repeatability import MODELS, export

from autocomp.hardware.ort_device import OrtDevice, _random_feed


def trace(paths: dict[str, Path], seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Start times (s) of each round and each model's thread-clock time (ms) in it."""
    device = OrtDevice(threads=1)
    runs = []
    for path in paths.values():
        session = device._session(str(path))
        feed = _random_feed(session, (1, 3, 224, 224))
        for _ in range(10):  # warm-up
            session.run(None, feed)
        runs.append((session, feed))
    starts, times = [], []
    begin = time.perf_counter()
    while (now := time.perf_counter() - begin) < seconds:
        row = []
        for session, feed in runs:
            t0 = time.thread_time_ns()
            session.run(None, feed)
            row.append((time.thread_time_ns() - t0) / 1e6)
        starts.append(now)
        times.append(row)
    return np.asarray(starts), np.asarray(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names")
    parser.add_argument("--seconds", type=float, default=300.0, help="how long to trace")
    parser.add_argument("--window", type=float, default=4.0, help="window length (s)")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="autocomp-drift-") as tmp:
        paths = {name: export(name, Path(tmp)) for name in args.models}
        starts, times = trace(paths, args.seconds)
    window = np.floor(starts / args.window).astype(int)
    medians = np.asarray([np.median(times[window == w], axis=0) for w in np.unique(window)])
    relative = medians / medians.min(axis=0)

    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(f"machine: {os.cpu_count()} CPUs, 1-minute load average {load}")
    print(
        f"{len(starts)} rounds in {args.seconds:.0f} s, {len(medians)} windows of {args.window} s"
    )
    print("\nwindow medians / the fastest window's, in time order")
    for j, name in enumerate(args.models):
        print(f"{name:<24}" + " ".join(f"{r:.2f}" for r in relative[:, j]))
    print(f"\n{'model':<24}{'fastest (ms)':>13}{'max/min':>9}{'cv':>8}{'windows <= 1.05':>17}")
    for j, name in enumerate(args.models):
        r = relative[:, j]
        cv = r.std() / r.mean()
        quiet = np.mean(r <= 1.05)
        print(f"{name:<24}{medians[:, j].min():13.3f}{r.max():9.2f}{cv:8.3f}{quiet:17.0%}")
    print(f"\n{'pair':<48}{'corr (log)':>11}{'ratio cv':>10}")
    logs = np.log(medians)
    for j in range(len(args.models)):
        for k in range(j + 1, len(args.models)):
            corr = np.corrcoef(logs[:, j], logs[:, k])[0, 1]
            ratio = medians[:, j] / medians[:, k]
            pair = f"{args.models[j]} / {args.models[k]}"
            print(f"{pair:<48}{corr:11.3f}{ratio.std() / ratio.mean():10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
