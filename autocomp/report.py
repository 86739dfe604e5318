"""The run report: ``report.json`` is the record; ``pareto.png`` and ``report.html`` are rendered
from it, so ``autocomp report RUN_DIR`` can re-render them at any time.

Layout of ``report.json`` (written by the pipeline, read here): ``budget`` (terms), ``device``
(DeviceInfo dict), ``chosen`` (candidate, ``accuracy`` {torch, onnx, supernet}, ``latency_ms``
{predicted, measured}, macs, flops, params, size_bytes), ``pareto`` (points with ``latency_ms`` and
``accuracy``), ``meets_budget``, ``notes`` and ``timings_s`` (wall time of each stage).
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from autocomp.errors import AutocompError

REPORT = "report.json"
PLOT = "pareto.png"
PAGE = "report.html"


def write_report(run_dir: str | Path, report: dict[str, Any]) -> Path:
    """Write ``report.json`` atomically, then render the plot and the page beside it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / REPORT, json.dumps(report, indent=2, sort_keys=True).encode())
    render(run_dir)
    return run_dir / REPORT


def load_report(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / REPORT
    if not path.is_file():
        raise AutocompError(f"no {REPORT} in {run_dir} (is it a run folder?)")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AutocompError(f"cannot read {path}: {err}") from None
    if not isinstance(report, dict) or "chosen" not in report:
        raise AutocompError(f"{path} is not an autocomp report (no 'chosen' entry)")
    return report


def render(run_dir: str | Path) -> dict[str, Any]:
    """(Re-)render ``pareto.png`` and ``report.html`` from ``report.json``."""
    run_dir = Path(run_dir)
    report = load_report(run_dir)
    png = _pareto_png(report)
    _atomic_write(run_dir / PLOT, png)
    _atomic_write(run_dir / PAGE, _html(report, png).encode())
    return report


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The final summary as (label, value) rows: for the terminal table and the HTML page."""
    chosen = report["chosen"]
    acc = chosen.get("accuracy", {})
    lat = chosen.get("latency_ms", {})
    budget = report.get("budget", {})
    measured = lat.get("measured")
    rows = [
        ("budget", ", ".join(f"{k} ≤ {_fmt(v)}" for k, v in budget.items()) or "none"),
        ("device", _device(report.get("device", {}))),
        ("meets budget", "yes" if report.get("meets_budget") else "NO"),
        ("accuracy (torch)", _pct(acc.get("torch"))),
        ("accuracy (ONNX)", _pct(acc.get("onnx"))),
        ("latency predicted", _ms(lat.get("predicted"))),
        ("latency measured", _ms(measured.get("median_ms") if measured else None)),
        ("MACs", _fmt(chosen.get("macs"))),
        ("params", _fmt(chosen.get("params"))),
        ("size", _fmt(chosen.get("size_bytes"), "B")),
    ]
    rows += [
        (f"time: {stage}", f"{sec:.1f} s") for stage, sec in report.get("timings_s", {}).items()
    ]
    return rows


def _device(info: dict[str, Any]) -> str:
    timing = info.get("extra", {}).get("timing")
    return info.get("profile", "?") + (f" ({timing} timing)" if timing else "")


def _pareto_png(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    points = [p for p in report.get("pareto", []) if p.get("latency_ms") is not None]
    if points:
        ax.plot(
            [p["latency_ms"] for p in points],
            [100 * p["accuracy"] for p in points],
            "o-",
            color="tab:blue",
            label="Pareto front (search)",
        )
    chosen = report["chosen"]
    lat = chosen.get("latency_ms", {})
    measured = (lat.get("measured") or {}).get("median_ms")
    acc = chosen.get("accuracy", {}).get("onnx") or chosen.get("accuracy", {}).get("torch")
    x = measured if measured is not None else lat.get("predicted")
    if x is not None and acc is not None:
        ax.plot([x], [100 * acc], "*", ms=16, color="tab:red", label="chosen (measured)")
    limit = report.get("budget", {}).get("latency_ms")
    if limit is not None:
        ax.axvline(limit, color="gray", ls="--", label=f"budget {limit:g} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with tempfile.TemporaryFile() as buf:
        fig.savefig(buf, format="png")
        plt.close(fig)
        buf.seek(0)
        return buf.read()


def _html(report: dict[str, Any], png: bytes) -> str:
    rows = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in summary_rows(report)
    )
    candidate = html.escape(json.dumps(report["chosen"].get("candidate"), indent=2))
    notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in report.get("notes", []))
    img = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>autocomp report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
th{{text-align:left;padding-right:2em}}pre{{background:#f4f4f4;padding:1em}}</style></head>
<body><h1>autocomp report</h1>
<table>{rows}</table>
<h2>Accuracy vs latency</h2><img alt="Pareto plot" src="data:image/png;base64,{img}">
<h2>Notes</h2><ul>{notes or "<li>none</li>"}</ul>
<h2>Chosen candidate</h2><pre>{candidate}</pre>
</body></html>
"""


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}".rstrip()
    return f"{value:.4g} {unit}".rstrip()


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f} ms"
