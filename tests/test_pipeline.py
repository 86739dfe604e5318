"""`autocomp search` end to end on a tiny space: run folder, report, verification, exit codes."""

import json
from dataclasses import replace

import pytest
import torch

from autocomp import api, cli
from autocomp.budget import Budget
from autocomp.errors import AutocompError
from autocomp.search import choice
from autocomp.spaces import Candidate
from tests.tiny_spaces import TINY_MBV3, tiny_space

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
def test_search_end_to_end(tiny, tmp_path, capsys, monkeypatch):
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
    assert {"latency model", "supernet", "search", "shortlist", "arbitration", "report"} <= set(
        report["timings_s"]
    )
    # The device decided which contenders to finetune (each measured first), then the finetune.
    key = Candidate.from_dict(chosen["candidate"]).key()
    winner = [row for row in report["arbitration"] if row.get("chosen")]
    assert [row["key"] for row in winner] == [key]
    assert winner[0]["finetuned_val_accuracy"] == chosen["accuracy"]["finetuned_val"]
    measured = {m["key"]: m["latency_measured_ms"] for m in report["shortlist"]}
    ranked = [row["key"] for row in report["arbitration"] if not row["baseline"]]
    assert ranked and all(measured[k] <= 50 for k in ranked)
    assert report["search"]["screening_budget_ms"] >= 50
    assert all(row["fits"] == (row["measured_ms"] <= 50) for row in report["seeding"])
    # model.pt is safe to load and rebuilds the chosen network.
    state = torch.load(run / "model.pt", weights_only=True)
    candidate = Candidate.from_json(state["candidate"])
    assert candidate.to_dict() == chosen["candidate"]
    # A second run into the same folder is refused without --resume, and writes nothing.
    before = sorted(p.name for p in run.iterdir())
    assert cli.main(["search", "--budget", "50ms", "--space", str(tiny), "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before
    # Resumed, it screens with the budget it started with, though the latency model's slack
    # (re-measured as the latency cache grows) would now give another.
    monkeypatch.setattr(choice, "screening", lambda budget, slack: replace(budget, latency_ms=99))
    argv = ["search", "--budget", "50ms,5MB", "--space", str(tiny), "--out", str(run)]
    assert cli.main([*argv, "--resume", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["search"]["screening_budget_ms"] == report["search"]["screening_budget_ms"]
    # Its supernet is refused to a search of another seed, whose validation images it trained on.
    other = tmp_path / "other"
    argv = ["search", "--budget", "50ms", "--space", str(tiny), "--out", str(other), "--seed", "1"]
    assert cli.main([*argv, "--supernet", str(run / "supernet.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained with seed 0" in err and "--seed 0" in err
    assert not other.exists()


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


def test_candidates_are_measured_as_trained_networks_deploy(tmp_path):
    """Fresh BatchNorms fold into equal biases, which the exporter shares (Identity nodes) and
    ORT then runs unfused and far slower: the latency model must not be fitted on such graphs."""
    import onnx

    space = tiny_space("mbv3", tmp_path, in_channels=1)
    batches = [torch.randn(16, 1, 32, 32)]
    values = space.values(space.largest())
    candidate = space.from_values({k: 8 if k.startswith("bits.") else v for k, v in values.items()})
    data, shape = api._to_onnx(space, batches)(candidate)
    graph = onnx.load_from_string(data).graph
    assert shape == (1, 1, candidate.resolution, candidate.resolution)
    assert "Identity" not in {n.op_type for n in graph.node}
    weights = [t.name for t in graph.initializer]
    assert len(weights) == len(set(weights))
    convs = sum(n.op_type == "Conv" for n in graph.node)
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) >= 2 * convs  # int8 throughout


@pytest.mark.parametrize(
    "config", ["{not json", '["a list"]', '{"screening_budget": {"latency": 2}}']
)
def test_resuming_from_a_damaged_config_is_refused_in_one_line(tmp_path, config):
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(AutocompError, match=r"^cannot resume the run in .*: its config\.json: "):
        api._screening_budget(tmp_path, Budget(latency_ms=2.0), 0.1)


def test_a_fresh_run_screens_with_the_widened_budget_and_a_resumed_one_with_its_own(tmp_path):
    assert api._screening_budget(tmp_path, Budget(latency_ms=2.0), 0.1).latency_ms == 2.2
    (tmp_path / "config.json").write_text('{"screening_budget": {"latency_ms": 2.18}}')
    assert api._screening_budget(tmp_path, Budget(latency_ms=2.0), 0.5).latency_ms == 2.18
