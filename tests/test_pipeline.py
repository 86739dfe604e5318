"""`autocomp search` end to end on a tiny space: run folder, report, verification, exit codes."""

import json

import pytest
import torch

from autocomp import api, cli
from autocomp.spaces import Candidate
from tests.tiny_spaces import TINY_MBV3

TINY = api.Effort(supernet_epochs=1, qat_epochs=0, latency_samples=4, trials=3, finetune_epochs=1)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(api.Effort, "of", classmethod(lambda cls, quick: TINY))
    monkeypatch.setattr(api, "REPAIR_ROUNDS", 2)
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_MBV3)
    return space


@pytest.mark.slow
def test_search_end_to_end(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(
        ["search", "--budget", "50ms,5MB", "--space", str(tiny), "--out", str(run), "--json"]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    for name in (
        "config.json",
        "study.db",
        "supernet.pt",
        "model.pt",
        "model.onnx",
        "report.json",
        "pareto.png",
        "report.html",
    ):
        assert (run / name).is_file(), name
    chosen = report["chosen"]
    assert report["meets_budget"] is True
    assert chosen["latency_ms"]["measured"]["median_ms"] <= 50
    assert chosen["size_bytes"] == (run / "model.onnx").stat().st_size <= 5e6
    assert 0 <= chosen["accuracy"]["onnx"] <= 1 and 0 <= chosen["accuracy"]["torch"] <= 1
    assert chosen["flops"] == 2 * chosen["macs"]
    assert {"latency model", "supernet", "search", "report"} <= set(report["timings_s"])
    # model.pt is safe to load and rebuilds the chosen network.
    state = torch.load(run / "model.pt", weights_only=True)
    candidate = Candidate.from_json(state["candidate"])
    assert candidate.to_dict() == chosen["candidate"]
    # A second run into the same folder is refused without --resume, and writes nothing.
    before = sorted(p.name for p in run.iterdir())
    assert cli.main(["search", "--budget", "50ms", "--space", str(tiny), "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.slow
def test_unachievable_budget_is_refused_before_writing(tiny, tmp_path, capsys):
    run = tmp_path / "never"
    assert (
        cli.main(["search", "--budget", "1k params", "--space", str(tiny), "--out", str(run)]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "smallest achievable: 0.002002M params" in err
    assert not run.exists()


@pytest.mark.slow
def test_unachievable_latency_is_refused_before_writing(tiny, tmp_path, capsys):
    run = tmp_path / "never"
    assert cli.main(["search", "--budget", "1us", "--space", str(tiny), "--out", str(run)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("autocomp: error: no candidate of space 'tiny' meets budget 0.001ms")
    assert "smallest achievable: latency" in last
    assert not run.exists()
