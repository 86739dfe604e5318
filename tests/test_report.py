"""Reports: report.json is the record, the plot and page re-render from it."""

import json

from autocomp import cli
from autocomp.report import load_report, write_report

REPORT = {
    "budget": {"latency_ms": 5.0},
    "device": {"profile": "cpu_onnxruntime-1.0_x86_64_test_t1_b1"},
    "chosen": {
        "candidate": {"space": "mbv3", "resolution": 32},
        "accuracy": {"torch": 0.975, "onnx": 0.9722},
        "latency_ms": {"predicted": 4.1, "measured": {"median_ms": 4.3, "p10_ms": 4.2}},
        "macs": 12.5e6,
        "params": 1.2e6,
        "size_bytes": 1.5e6,
    },
    "pareto": [{"latency_ms": 1.0, "accuracy": 0.9}, {"latency_ms": 4.3, "accuracy": 0.97}],
    "meets_budget": True,
    "notes": ["a <note> that needs escaping"],
    "timings_s": {"supernet": 12.0},
}


def test_write_and_rerender(tmp_path):
    write_report(tmp_path, REPORT)
    assert json.loads((tmp_path / "report.json").read_text()) == REPORT
    png = (tmp_path / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    page = (tmp_path / "report.html").read_text()
    assert "97.22%" in page and "4.300 ms" in page and "&lt;note&gt;" in page
    (tmp_path / "pareto.png").unlink()
    assert cli.main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert load_report(tmp_path)["chosen"]["macs"] == 12.5e6


def test_report_cli_summary_and_errors(tmp_path, capsys):
    write_report(tmp_path, REPORT)
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "latency measured     4.300 ms" in out and "meets budget         yes" in out
    assert f"device               {REPORT['device']['profile']}\n" in out
    write_report(tmp_path, REPORT | {"device": {"profile": "p", "extra": {"timing": "reference"}}})
    assert cli.main(["report", str(tmp_path)]) == 0
    assert "device               p (reference timing)\n" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "no report.json in" in capsys.readouterr().err
    (tmp_path / "report.json").write_text("{truncated")
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err
