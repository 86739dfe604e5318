"""Orchestration: the only module that wires stages together. The CLI is a thin layer over it.

Stages are imported inside the functions that use them, so that a command only pays for the stages
it runs (``autocomp --help`` and budget errors answer at once, without loading torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from autocomp.budget import Budget
from autocomp.errors import AutocompError

if TYPE_CHECKING:
    from autocomp.hardware import Measurement


def measure(
    model: str | Path,
    *,
    device: str = "cpu",
    input_shape: tuple[int, ...] | None = None,
    threads: int = 1,
    profile: bool = False,
) -> Measurement:
    """Measure an ONNX file's latency on ``device`` (input shape read from the model if static)."""
    from autocomp import hardware

    path = Path(model)
    if not path.is_file():
        raise AutocompError(f"model file not found: {path}")
    onnx_model = hardware.load_onnx(path)
    shape = input_shape or hardware.static_input_shape(onnx_model, path)
    return hardware.get_device(device, threads=threads).measure(onnx_model, shape, profile=profile)


def devices() -> list[dict[str, Any]]:
    """Every device kind this machine could measure on, with its profile or why not."""
    from autocomp import hardware

    return hardware.available_devices()


def describe_data(
    spec: str, *, resolution: int | None = None, channels: int | None = None
) -> dict[str, Any]:
    """Load a dataset spec exactly as a search would and summarise it."""
    from autocomp import data

    return data.load(spec, resolution=resolution, channels=channels).summary()


def report(run_dir: str | Path) -> dict[str, Any]:
    """Re-render a run folder's plot and page from its report.json, and return the report."""
    from autocomp import report as reporting

    return reporting.render(run_dir)


def report_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary of a report as (label, value) rows."""
    from autocomp import report as reporting

    return reporting.summary_rows(report)


def serve_device(
    *, host: str, port: int, token: str | None, max_bytes: int, threads: int = 1
) -> None:
    """Run a measurement agent until interrupted."""
    from autocomp import hardware

    hardware.serve(host=host, port=port, token=token, max_bytes=max_bytes, threads=threads)


def search(*, budget: str | Budget, device: str = "cpu", data: str = "digits", threads: int = 1):
    """Search the most accurate model under ``budget`` on ``device``.

    The inputs are validated now (so mistakes surface at once); the search pipeline itself is not
    available yet and this says so rather than returning a made-up result.
    """
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    from autocomp import data as data_specs
    from autocomp import hardware

    dev = hardware.get_device(device, threads=threads)
    dataset = data_specs.load(data)
    raise NotImplementedError(
        f"search is not available yet: inputs are valid (budget {budget}, device "
        f"{dev.info.profile}, data {dataset.name} with {len(dataset.y_train)} training images), "
        "but the search pipeline has not landed"
    )
