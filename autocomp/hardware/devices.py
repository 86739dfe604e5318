"""Device specs (``cpu``, ``torch-cpu``, ``cuda[:N]``, ``remote://HOST:PORT``) and what is here."""

from __future__ import annotations

from typing import Any

from autocomp.errors import AutocompError
from autocomp.hardware.base import Device
from autocomp.hardware.timing import DEFAULT_TIMING, Timing

ACCEPTED_SPECS = "'cpu', 'torch-cpu', 'cuda', 'cuda:N' or 'remote://HOST:PORT'"


def get_device(spec: str, *, threads: int = 1, timing: Timing = DEFAULT_TIMING) -> Device:
    """The device named by ``spec``.

    ``threads`` is the intra-op thread count used for timing (default 1: the most repeatable);
    ``timing`` sets warm-up and repeats of local devices. A remote agent uses its own settings.
    """
    text = spec.strip()
    if timing.reference and text != "cpu":
        raise AutocompError("--reference times on the local cpu device only")
    if text == "cpu":
        from autocomp.hardware.ort_device import OrtDevice

        return OrtDevice(threads, timing=timing)
    if text == "torch-cpu" or text == "cuda" or text.startswith("cuda:"):
        from autocomp.hardware.torch_device import TorchDevice

        return TorchDevice(threads, cuda=_cuda_index(text), timing=timing)
    if text.startswith("remote://"):
        from autocomp.hardware.remote import RemoteDevice

        if threads != 1:
            raise AutocompError(
                "a remote agent's threads are set where it runs: autocomp device serve --threads N"
            )
        return RemoteDevice(text)
    raise AutocompError(f"unknown device {spec!r}; use {ACCEPTED_SPECS}")


def _cuda_index(text: str) -> int | None:
    if text == "torch-cpu":
        return None
    index = text.partition(":")[2] or "0"
    if not index.isdigit():
        raise AutocompError(f"unknown device {text!r}; use {ACCEPTED_SPECS}")
    return int(index)


def available_devices() -> list[dict[str, Any]]:
    """One row per device spec: whether it works here, why not, and its profile."""
    import torch

    from autocomp.hardware.torch_device import NO_CUDA

    specs = ["cpu", "torch-cpu"]
    specs += [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cuda"]
    rows = []
    for spec in specs:
        try:
            info = get_device(spec).info.to_dict()
        except AutocompError as err:
            reason = NO_CUDA if spec == "cuda" and not torch.cuda.is_available() else str(err)
            rows.append({"spec": spec, "available": False, "reason": reason, "info": None})
        else:
            rows.append({"spec": spec, "available": True, "reason": None, "info": info})
    rows.append(
        {
            "spec": "remote://HOST:PORT",
            "available": False,
            "reason": "needs an agent: run 'autocomp device serve' on the target",
            "info": None,
        }
    )
    return rows
