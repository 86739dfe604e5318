"""`autocomp search` end to end on a tiny space: run folder, report, verification, exit codes."""

import json

import numpy as np
import pytest
import torch

from autocomp import api, cli
from autocomp.budget import Budget
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


class KnownLatency:
    """A latency model whose predictions are off: ``predicted`` and ``truth`` per candidate key."""

    def __init__(self, predicted, truth):
        self.predicted, self.truth, self.measured, self.corrected = predicted, truth, [], []

    def measure(self, candidate):
        self.measured.append(candidate.key())
        return self.truth[candidate.key()]

    def correct(self, candidate, ms):
        self.corrected.append((candidate.key(), ms))

    def predict(self, candidates):
        return np.array([self.predicted[c.key()] for c in candidates])


def test_the_device_decides_among_the_most_accurate(tmp_path, monkeypatch):
    space = tiny_space("mbv3", tmp_path)
    rng = np.random.default_rng(0)
    candidates = list({c.key(): c for c in (space.sample(rng) for _ in range(8))}.values())[:6]
    # accuracy, predicted ms, measured ms (budget 1 ms); the last is too big by its FLOPs
    table = [(0.9, 0.9, 1.3), (0.8, 1.2, 0.95), (0.7, 0.5, 0.4), (0.6, 0.8, 0.7), (0.5, 0.9, 2.0)]
    trials = [
        {
            "number": i,
            "accuracy": acc,
            "candidate": c.to_dict(),
            "latency_predicted_ms": pred,
            "flops": 1e6,
        }
        for i, (c, (acc, pred, _)) in enumerate(zip(candidates, table, strict=False))
    ]
    trials.append({**trials[0], "number": 5, "candidate": candidates[5].to_dict(), "flops": 9e9})
    trials[-1]["accuracy"] = 0.99
    keys = [c.key() for c in candidates]
    latency = KnownLatency(
        {k: t["latency_predicted_ms"] for k, t in zip(keys, trials, strict=True)},
        {k: row[2] for k, row in zip(keys, [*table, (0, 0, 0.1)], strict=True)},
    )
    budget = Budget.parse("1ms,1GFLOPs")
    log: list = []
    # Predicted under the budget but measured over: skipped; predicted over, measured under: won.
    chosen = api._measured_choice(trials, latency, budget, [], log)
    assert chosen["number"] == 1 and chosen["latency_measured_ms"] == 0.95
    assert latency.measured == keys[:2]  # most accurate first; the 9 GFLOPs one never measured
    assert [m["latency_measured_ms"] for m in log] == [1.3, 0.95]
    assert latency.corrected == [(keys[0], 1.3), (keys[1], 0.95)]
    # Once it is tried, the next is measured; nothing is measured twice.
    again = api._measured_choice(trials, latency, budget, [keys[1]], log)
    assert again["number"] == 2 and latency.measured == keys[:3]
    # Past the shortlist, the corrected model chooses among the rest without measuring.
    monkeypatch.setattr(api, "SHORTLIST", 0)
    rest = api._measured_choice(trials, latency, budget, [keys[1], keys[2]], log)
    assert rest["number"] == 3 and "latency_measured_ms" not in rest
    assert latency.measured == keys[:3]


def test_the_search_screens_with_the_latency_models_slack():
    assert api._screening(Budget.parse("2ms,1MB"), 0.25) == Budget.parse("2.5ms,1MB")
    assert api._screening(Budget.parse("1MB"), 0.25) == Budget.parse("1MB")


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
