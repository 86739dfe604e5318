"""Timing one callable truthfully: warm-up, enough repeats for a stable median, robust statistics.

Shared by every local device so that all of them follow the same rules:

* warm-up first (caches, memory arenas, CPU frequency, lazy initialisation), for at least
  ``warmup_runs`` runs *and* ``warmup_s`` seconds, but never more than ``max_warmup_s`` seconds;
* then time single runs until there are at least ``min_runs`` samples *and* ``min_s`` seconds of
  them, or ``max_runs`` samples (tiny models);
* report the *steady* median: the median of the samples in the undisturbed stretches of the run,
  plus the 10th/90th percentiles of all samples (the tail a busy machine adds stays visible);
* on devices with sessions (ONNX Runtime), split the runs over ``sessions`` fresh sessions and
  report the median of their steady medians.

Why several sessions: fresh sessions of one model in one process differ by up to 4% (buffer
placement in memory, which core the session settles on), as much as separate processes do, so
a single session's median carries that spread into the result. On the idle machine, 2 s sessions
of efficientnet_b0 and mobilenetv3_large_100 varied by 0.9% and 1.2% (coefficient of variation),
the median of three of them by 0.8% and 0.8%; the largest deviation fell from 3.2% to 2.1%.

Why the steady median: on a shared host, interference from other tenants comes in bursts of about
a second that slow every run inside them by 10-30% (the thread CPU-time clock cannot see it: a
neighbour on the sibling core slows our instructions, it does not deschedule us). Plain medians of
2 s runs of one model then varied by up to 20% between processes, while the fast part of each run
agreed within 2-3%. The samples are cut into consecutive blocks of ``BLOCK`` runs; blocks whose
median lies within ``STEADY`` of the fastest block's are undisturbed, and the reported median is
taken over them. On a quiet machine every block is steady and this is the plain median; the 6 s
default run makes it likely that a burst leaves some steady blocks.

Which clock: when the whole inference runs in the calling thread (CPU, one intra-op thread), a
sample is that thread's CPU time (``time.thread_time_ns``). On an idle core this equals the wall
time; on a busy machine it leaves out the time the OS gave to *other* processes, which is not the
model's latency (on the 2-core shared machine where this was written, wall-clock medians of one
model varied by 50% between processes, thread CPU time by 1-4%). With several threads or on a GPU
the work runs elsewhere, so samples are wall time (``time.perf_counter_ns``) and need a quiet
machine. ``Timing(clock="wall")`` forces wall time.

The garbage collector is paused while timing so that its pauses do not land inside a sample.
"""

from __future__ import annotations

import gc
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from autocomp.errors import AutocompError

#: Nanosecond clocks a sample can be read from.
CLOCKS: dict[str, Callable[[], int]] = {"wall": time.perf_counter_ns, "thread": time.thread_time_ns}


@dataclass(frozen=True)
class Timing:
    """How long to warm up and how many runs to time; the defaults favour stability over speed."""

    warmup_runs: int = 10
    warmup_s: float = 0.5
    max_warmup_s: float = 5.0
    min_runs: int = 30
    min_s: float = 6.0  # long enough to outlast the bursts of a noisy neighbour (module doc)
    max_runs: int = 2000
    clock: str = "auto"  # "auto" (see module doc), "wall" or "thread"
    sessions: int = 3  # fresh sessions the runs are split over, where the device has sessions
    #: Scale the model's runs to the host's calibrated speed by a reference model timed in
    #: alternation (:mod:`autocomp.hardware.reference`; one CPU thread only).
    reference: bool = False

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS and self.clock != "auto":
            raise AutocompError(f"unknown clock {self.clock!r}; use 'auto', 'wall' or 'thread'")
        if self.sessions < 1:
            raise AutocompError(f"sessions must be at least 1, got {self.sessions}")

    def per_session(self) -> Timing:
        """The share of the timed runs one of ``sessions`` sessions makes (each warms up fully)."""
        n = self.sessions
        return replace(
            self,
            min_runs=-(-self.min_runs // n),
            min_s=self.min_s / n,
            max_runs=-(-self.max_runs // n),
            sessions=1,
        )

    def resolve_clock(self, *, in_calling_thread: bool) -> str:
        """The clock to use: thread CPU time only where all the work is in the calling thread."""
        if self.clock != "auto":
            return self.clock
        return "thread" if in_calling_thread else "wall"


DEFAULT_TIMING = Timing()
#: For screening many candidates (latency-model fits, policy searches): shorter than a verification.
SCREEN_TIMING = Timing(warmup_s=0.2, min_runs=20, min_s=0.4, sessions=1)


#: Runs of the model, then of the reference, per block of :func:`time_alternating`.
REFERENCE_BLOCK = 3


def time_runs(
    run: Callable[[], object], timing: Timing = DEFAULT_TIMING, *, clock: str = "wall"
) -> list[float]:
    """Milliseconds of each timed call of ``run`` (which must block until its work is done)."""
    return time_alternating(run, None, timing, clock=clock)[0]


def time_alternating(
    run: Callable[[], object],
    reference: Callable[[], object] | None,
    timing: Timing = DEFAULT_TIMING,
    *,
    clock: str = "wall",
) -> tuple[list[float], list[float]]:
    """Milliseconds of each timed call of ``run`` and, with a ``reference``, of the reference's
    calls, timed in alternating blocks of :data:`REFERENCE_BLOCK` runs each (``run``'s first):
    the reference sees the host at the same moments as the model
    (:mod:`autocomp.hardware.reference`)."""
    now = CLOCKS[clock]
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for warm in (run, reference):
            if warm is None:
                continue
            start = time.perf_counter()
            n = 0
            while True:
                warm()
                n += 1
                elapsed = time.perf_counter() - start
                if (n >= timing.warmup_runs and elapsed >= timing.warmup_s) or (
                    elapsed >= timing.max_warmup_s
                ):
                    break
        samples: list[float] = []
        references: list[float] = []
        total = 0.0
        while len(samples) < timing.max_runs and (
            len(samples) < timing.min_runs or total < timing.min_s
        ):
            for _ in range(REFERENCE_BLOCK if reference else 1):
                t0 = now()
                run()
                dt = (now() - t0) / 1e9
                samples.append(dt * 1e3)
                total += dt
            for _ in range(REFERENCE_BLOCK if reference else 0):
                t0 = now()
                reference()
                references.append((now() - t0) / 1e6)
        return samples, references
    finally:
        if gc_was_enabled:
            gc.enable()


#: Runs per block, and how far above the fastest block's median a steady block may lie.
BLOCK, STEADY = 10, 0.05


def steady(samples: list[float]) -> np.ndarray:
    """The samples of the undisturbed blocks of a run, in order (all of them when the run is too
    short to tell: under three blocks)."""
    x = np.asarray(samples, dtype=np.float64)
    n = len(x) // BLOCK
    if n < 3:
        return x
    blocks = x[: n * BLOCK].reshape(n, BLOCK)
    medians = np.median(blocks, axis=1)
    return blocks[medians <= medians.min() * (1 + STEADY)].ravel()


def summarize(*sessions: list[float]) -> tuple[float, float, float]:
    """Median over sessions of their steady medians, and the 10th and 90th percentile of all
    samples (ms), from the timed runs of one or more sessions (see the module doc)."""
    everything = np.concatenate([np.asarray(samples, np.float64) for samples in sessions])
    p10, p90 = np.percentile(everything, [10, 90])
    median = float(np.median([np.median(steady(samples)) for samples in sessions]))
    return median, float(min(p10, median)), float(max(p90, median))


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name, with its family, model and stepping where the kernel reports
    them (from ``cpuinfo``, the text of ``/proc/cpuinfo``, read when not given), or what
    ``platform`` knows elsewhere.

    The name alone does not identify a CPU: cloud VMs report bare names (two hosts of this
    project both said "AMD EPYC", and one ran the same models twice as fast as the other), and
    a latency predictor must never serve a CPU it was not measured on.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    name = next((fields[k] for k in ("model name", "Model", "Hardware") if fields.get(k)), "")
    if not name:
        return platform.processor() or platform.machine() or "unknown"
    if all(fields.get(k) for k in ("cpu family", "model", "stepping")):
        name += f" (family {fields['cpu family']}, model {fields['model']}, "
        name += f"stepping {fields['stepping']})"
    return name
