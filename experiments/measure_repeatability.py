"""Acceptance 2 and 3 of issue 2: are `autocomp measure` latencies repeatable, local and remote?

For a few timm CNNs at 224x224 (random weights, exported to ONNX), this runs the real command line
``autocomp measure --json`` in separate processes, alternating the local ``cpu`` device with a
``remote://127.0.0.1:PORT`` agent started as a subprocess (and which of the two goes first, so
that a drifting background load favours neither), and prints

* repeatability: the per-process medians, their median and the largest deviation from it
  (criterion: every process within +-5%);
* remote vs local: the median of the remote medians over the median of the local ones
  (criterion: within +-10%).

Exit status 1 when a criterion fails. The criteria are about the measuring method, so they need a
machine without heavy background load: the load average is printed to tell (single-thread CPU
timing reads the thread's CPU time, which leaves out time given to other processes, but memory-bound
models still slow down when neighbours evict the shared cache). Run from the repository root:

    python experiments/measure_repeatability.py            # 3-5 minutes on 2 cores
    python experiments/measure_repeatability.py --models resnet18 --runs 5
    python experiments/measure_repeatability.py --reference   # also 'measure --reference'
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

MODELS = ("resnet18", "mobilenetv3_large_100", "efficientnet_b0", "regnetx_002")
REPEAT_TOLERANCE = 0.05
REMOTE_TOLERANCE = 0.10


def export(name: str, folder: Path) -> Path:
    """timm model ``name`` (random weights: latency does not depend on them) as ONNX, batch 1."""
    import timm
    import torch

    path = folder / f"{name}.onnx"
    model = timm.create_model(name, pretrained=False).eval()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), path, external_data=False)
    return path


def cli_median(model: Path, device: str, env: dict[str, str], *flags: str) -> float:
    """Median latency (ms) reported by one fresh ``autocomp measure --json`` process."""
    cmd = [sys.executable, "-m", "autocomp.cli", "measure", "--model", str(model), "--json"]
    proc = subprocess.run(
        [*cmd, "--device", device, *flags], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"autocomp measure failed ({proc.returncode}): {proc.stderr.strip()}")
    return float(json.loads(proc.stdout)["median_ms"])


def start_agent(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """An ``autocomp device serve`` subprocess on a free port, and its remote:// spec."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agent = subprocess.Popen(
        [sys.executable, "-m", "autocomp.cli", "device", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = agent.stdout.readline() if agent.stdout else ""
    if not line.startswith("serving on "):
        agent.kill()
        raise SystemExit(f"the agent did not start: {line!r}")
    return agent, f"remote://127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names")
    parser.add_argument("--runs", type=int, default=5, help="processes per model and side")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also time each model with 'autocomp measure --reference' in every round (the "
        "reference is calibrated afresh, in a temporary cache, by the first such process)",
    )
    args = parser.parse_args()

    env = {**os.environ, "AUTOCOMP_DEVICE_TOKEN": secrets.token_hex(16)}
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="autocomp-repeat-") as tmp:
        env["AUTOCOMP_CACHE"] = str(Path(tmp) / "cache")
        paths = {name: export(name, Path(tmp)) for name in args.models}
        agent, remote = start_agent(env)
        try:
            for name, path in paths.items():
                local, far, referenced = [], [], []
                for run in range(args.runs):  # alternate which side goes first
                    sides = [(local, "cpu", ()), (far, remote, ())]
                    if args.reference:
                        sides.append((referenced, "cpu", ("--reference",)))
                    for medians, device, flags in sides if run % 2 == 0 else sides[::-1]:
                        medians.append(cli_median(path, device, env, *flags))
                rows.append((name, local, far, referenced))
                print(f"measured {name}", file=sys.stderr, flush=True)
        finally:
            agent.terminate()
            agent.wait(timeout=30)

    ok = True
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(f"\nmachine: {os.cpu_count()} CPUs, 1-minute load average {load}")
    tables = [("", 1)] + ([(" --reference", 3)] if args.reference else [])
    for flag, column in tables:
        print(
            f"\nRepeatability: {args.runs} separate 'autocomp measure --device cpu{flag}' processes"
        )
        print(f"{'model':<24}{'medians (ms)':<44}{'median':>9}{'max dev':>9}  ok (±5%)")
        for row in rows:
            name, medians = row[0], row[column]
            mid = statistics.median(medians)
            dev = max(abs(m - mid) for m in medians) / mid
            ok &= dev <= REPEAT_TOLERANCE
            shown = " ".join(f"{m:7.3f}" for m in medians)
            print(f"{name:<24}{shown:<44}{mid:9.3f}{dev * 100:8.1f}%  {dev <= REPEAT_TOLERANCE}")

    print(f"\nRemote agent vs local cpu (median of {args.runs} processes each, interleaved)")
    print(f"{'model':<24}{'local (ms)':>11}{'remote (ms)':>12}{'ratio':>8}  ok (±10%)")
    for name, local, far, _ in rows:
        near_mid, far_mid = statistics.median(local), statistics.median(far)
        ratio = far_mid / near_mid
        good = abs(ratio - 1) <= REMOTE_TOLERANCE
        ok &= good
        print(f"{name:<24}{near_mid:11.3f}{far_mid:12.3f}{ratio:8.3f}  {good}")
    print("\nall criteria met" if ok else "\nSOME CRITERIA FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
