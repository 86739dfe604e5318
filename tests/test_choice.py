"""Choosing the network a search ships: seeds and baselines, the measured shortlist, ties, and
arbitration among finetuned contenders."""

import numpy as np

from autocomp.budget import Budget
from autocomp.search import choice, seeding
from autocomp.spaces.candidate import Candidate
from tests.tiny_spaces import tiny_space


class KnownLatency:
    """A latency model whose predictions are off: ``predicted`` and ``truth`` per candidate key."""

    def __init__(self, predicted, truth):
        self.predicted, self.truth, self.measured, self.corrected = predicted, truth, [], []

    def measure(self, candidate):
        self.measured.append(candidate.key())
        return self.truth[candidate.key()]

    def correct(self, candidate, ms):
        self.corrected.append((candidate.key(), ms))

    def predict(self, candidates, measured=True):
        return np.array([self.predicted[c.key()] for c in candidates])


EXACT = 10**9  # validation images: scores are exact, no two are tied


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
            "macs": 5e5,
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
    chosen = choice.measured_choice(trials, latency, budget, [], log, EXACT)
    assert chosen["number"] == 1 and chosen["latency_measured_ms"] == 0.95
    assert chosen["latency_predicted_ms"] == 1.2  # what the model said, for the report
    assert latency.measured == keys[:2]  # most accurate first; the 9 GFLOPs one never measured
    assert [m["latency_measured_ms"] for m in log] == [1.3, 0.95]
    assert latency.corrected == [(keys[0], 1.3), (keys[1], 0.95)]
    # Once it is tried, the next is measured; nothing is measured twice.
    again = choice.measured_choice(trials, latency, budget, [keys[1]], log, EXACT)
    assert again["number"] == 2 and latency.measured == keys[:3]
    # Past the shortlist, the corrected model chooses among the rest without measuring.
    monkeypatch.setattr(choice, "SHORTLIST", 0)
    rest = choice.measured_choice(trials, latency, budget, [keys[1], keys[2]], log, EXACT)
    assert rest["number"] == 3 and "latency_measured_ms" not in rest
    assert latency.measured == keys[:3]


def test_scores_within_the_validation_noise_are_tied_and_the_largest_goes_first(tmp_path):
    space = tiny_space("mbv3", tmp_path)
    rng = np.random.default_rng(0)
    small, big, bigger = sorted(
        {c.key(): c for c in (space.sample(rng) for _ in range(6))}.values(),
        key=lambda c: space.cost(c).macs,
    )[:3]
    rows = [(small, 0.90), (big, 0.88), (bigger, 0.80)]  # standard error at 100 images: 0.03
    trials = [
        {"number": i, "accuracy": a, "candidate": c.to_dict(), "macs": space.cost(c).macs}
        for i, (c, a) in enumerate(rows)
    ]
    keys = {c.key(): 0.5 for c, _ in rows}
    latency = KnownLatency(keys, keys)
    chosen = choice.measured_choice(trials, latency, Budget.parse("1ms"), [], [], 100)
    assert chosen["number"] == 1  # tied with the best, and larger; 0.80 is not tied
    exact = choice.measured_choice(trials, latency, Budget.parse("1ms"), [], [], EXACT)
    assert exact["number"] == 0
    # Without a latency term nothing is measured; the ties are read alike.
    latency.measured.clear()
    no_latency = Budget.parse("1GFLOPs")
    for t in trials:
        t["flops"] = 2 * t["macs"]
    assert choice.measured_choice(trials, latency, no_latency, [], [], 100)["number"] == 1
    assert latency.measured == []
    assert (
        choice.measured_choice(
            trials, latency, no_latency, [small.key(), big.key(), bigger.key()], [], 100
        )
        is None
    )


def test_uniform_scalings_and_search_seeds(tmp_path):
    space = tiny_space("mbv3", tmp_path)
    grid = seeding.uniform_scalings(space, 8)
    macs = [space.cost(c).macs for c in grid]
    assert macs == sorted(macs, reverse=True) and len(grid) == 2 * 3  # widths × keep ratios
    assert (
        grid[0].key()
        == space.from_values(
            {k: 8 if k.startswith("bits.") else v for k, v in space.values(space.largest()).items()}
        ).key()
    )
    assert all(set(c.bits.values()) == {8} for c in grid)
    assert all(c.resolution == space.largest().resolution for c in grid)

    class HalfLatency:  # 1 ms per 10⁶ MACs, which the model under-predicts by half
        def __init__(self):
            self.added = []

        def predict(self, candidates):
            return np.array([space.cost(c).macs / 2e6 for c in candidates])

        def measure(self, candidate):
            return space.cost(candidate).macs / 1e6

        def add(self, candidate, ms):
            self.added.append(candidate.key())

    limit = sorted(macs)[2] / 1e6  # the third-narrowest int8 scaling fits, no wider one
    budget = Budget(latency_ms=limit)
    latency = HalfLatency()
    log = []
    screening = choice.screening(budget, 0.5)
    seeds, baselines = seeding.search_seeds(space, budget, screening, latency, log)
    assert [row["key"] for row in log] == latency.added  # every seeding measurement, logged
    assert [row["fits"] for row in log] == [row["measured_ms"] <= limit for row in log]
    assert {row["bits"] for row in log if row["fits"]} == {8, 32}
    assert seeds[0].key() == space.largest().key()
    # Per precision: the widest that screening admits that fits as measured, found by measuring
    # the widest admitted, then bisecting (at most SEED_MEASUREMENTS measurements). Both are
    # seeds; the int8 one is the fp32 one's network with fewer bits, so only fp32 is a baseline.
    assert [space.cost(c).macs / 1e6 for c in seeds[1:]] == [limit, limit]
    assert grid[3].key() == seeds[1].key()
    assert [c.key() for c in baselines] == [seeds[2].key()]
    assert set(baselines[0].bits.values()) == {32}
    admitted = [c for c in grid if space.cost(c).macs / 2e6 <= 1.5 * limit]
    int8_measured = [row["key"] for row in log if row["bits"] == 8]
    assert int8_measured[0] == admitted[0].key() and grid[3].key() in int8_measured
    assert set(int8_measured) <= {c.key() for c in admitted}
    assert len(int8_measured) <= seeding.SEED_MEASUREMENTS
    # Without a latency term nothing is measured: the widest that meets the budget is taken.
    latency.added.clear()
    flops = Budget(flops=2 * sorted(macs)[2])
    assert [c.key() for c in seeding.search_seeds(space, flops, flops, latency)[1]] == [
        seeding.uniform_scalings(space, 32)[3].key(),
    ]
    assert latency.added == []
    # Where int8 fits a wider network than fp32 (here: int8 runs at half the latency), both are
    # baselines.
    latency.measure = lambda c: space.cost(c).macs / 1e6 / (2 if 8 in c.bits.values() else 1)
    _, both = seeding.search_seeds(space, budget, screening, latency)
    assert [set(c.bits.values()) for c in both] == [{8}, {32}]
    assert space.cost(both[0]).macs > space.cost(both[1]).macs


def test_contenders_are_the_measured_best_and_the_baselines_and_the_finetune_decides(tmp_path):
    space = tiny_space("mbv3", tmp_path)
    rng = np.random.default_rng(1)
    a, b, c, d, e, base = list(
        {x.key(): x for x in (space.sample(rng) for _ in range(12))}.values()
    )[:6]
    rows = [(a, 0.9), (b, 0.8), (c, 0.7), (d, 0.6), (e, 0.55), (base, 0.5)]
    trials = [
        {"number": i, "accuracy": acc, "candidate": x.to_dict(), "macs": 1, "flops": 2}
        for i, (x, acc) in enumerate(rows)
    ]
    measured = dict(zip([x.key() for x, _ in rows], [0.5, 2.0, 0.7, 0.9, 0.95, 0.8], strict=True))
    predicted = dict.fromkeys(measured, 0.7) | {d.key(): 0.95, e.key(): 0.85}
    latency = KnownLatency(predicted, measured)
    budget = Budget.parse("1ms")
    log: list = []

    def choose(tried, among=trials):
        return choice.measured_choice(among, latency, budget, tried, log, EXACT)

    contenders = choice.contenders(choose, trials, [base], latency, budget)
    # b measured over the budget: the two measured best are a and c; then the best of those
    # predicted to use 80% of the budget or more (d, e), d; then the baseline.
    assert [r["number"] for r in contenders] == [0, 2, 3, 5]
    assert [r.get("baseline", False) for r in contenders] == [False, False, False, True]
    assert contenders[-1]["latency_predicted_ms"] == 0.7  # the model's own estimate
    assert latency.measured == [a.key(), b.key(), c.key(), d.key()]
    # The finetune decides: the baseline wins on validation after it.
    after = {a.key(): 0.91, c.key(): 0.93, d.key(): 0.92, base.key(): 0.95}
    loss = {a.key(): 0.1, c.key(): 0.5, d.key(): 0.2, base.key(): 0.4}
    tuned = []

    def finetune(candidate, record):
        tuned.append(candidate.key())
        key = candidate.key()
        return None, {"val_accuracy": after[key], "val_loss": loss[key]}

    chosen, table = choice.arbitrate(contenders, finetune, EXACT)
    assert chosen["number"] == 5 and tuned == [a.key(), c.key(), d.key(), base.key()]
    assert [row.get("chosen", False) for row in table] == [False, False, False, True]
    assert [row["finetuned_val_accuracy"] for row in table] == [0.91, 0.93, 0.92, 0.95]
    assert [row["finetuned_val_loss"] for row in table] == [0.1, 0.5, 0.2, 0.4]
    assert choice.arbitrate([], finetune, EXACT) == (None, [])
    # On 100 validation images (standard error 0.022 at 0.95), 0.93 is tied with 0.95 and 0.92
    # is not: the surer of the tied two (lower cross-entropy) wins, whatever its MACs.
    for row, macs in zip(contenders, [1, 5, 9, 4], strict=True):
        row["macs"] = macs
    assert choice.arbitrate(contenders, finetune, 100)[0]["number"] == 5
    loss[c.key()] = 0.3
    assert choice.arbitrate(contenders, finetune, 100)[0]["number"] == 2
    assert choice.arbitrate(contenders, finetune, EXACT)[0]["number"] == 5
    # Equal accuracies and losses: the ranking's order decides.
    after, loss = dict.fromkeys(after, 0.9), dict.fromkeys(loss, 0.3)
    assert choice.arbitrate(contenders, finetune, EXACT)[0]["number"] == 0


def test_a_subnet_of_a_contender_at_no_more_bits_is_not_finetuned(tmp_path):
    space = tiny_space("mbv3", tmp_path)
    full, twin = seeding.uniform_scalings(space, 32)[0], seeding.uniform_scalings(space, 8)[0]
    small = space.sample(np.random.default_rng(2))
    assert twin.within(full) and small.within(full) and full.within(full)
    assert not full.within(twin) and not full.within(small)
    lower = Candidate.from_dict(full.to_dict() | {"resolution": full.resolution // 2})
    assert lower.within(full) and not full.within(lower)
    # The int8 twin ranks first; every candidate fits, so the budget does not bind.
    rows = [(twin, 0.99), (full, 0.98), (small, 0.97)]
    trials = [
        {"number": i, "accuracy": acc, "candidate": x.to_dict(), "macs": 1, "flops": 2}
        for i, (x, acc) in enumerate(rows)
    ]
    every = {x.key(): 0.5 for x in (full, twin, small, lower)}
    latency = KnownLatency(every, every)
    budget = Budget.parse("1ms")

    def choose(tried, among=trials):
        return choice.measured_choice(among, latency, budget, tried, [], EXACT)

    plain = choice.contenders(choose, trials, [full], latency, budget)
    assert [r["number"] for r in plain] == [0, 1]
    assert choice.contenders(choose, trials, [], latency, budget) == plain
    # The full network contains the others: it alone is finetuned, picked first where it is a
    # baseline, and second where it is not, the first (its int8 twin) being within it.
    for baselines in ([full], []):
        nested = choice.contenders(choose, trials, baselines, latency, budget, nested=True)
        assert [r["number"] for r in nested] == [1]
    # The lowest resolution's full network and the int8 twin hold neither the other.
    trials[2]["candidate"] = lower.to_dict()
    picks = choice.contenders(choose, trials[::2], [twin], latency, budget, nested=True)
    assert [r["number"] for r in picks] == [0, 2]


def test_the_widest_fitting_scaling_is_found_by_bisection():
    latencies = [3.0, 2.6, 2.2, 1.9, 1.7, 1.4, 1.2, 0.9, 0.7, 0.5, 0.4, 0.3]  # widest first
    measured = []

    def fits(i):
        measured.append(i)
        return latencies[i] <= 1.0

    scalings = list(range(len(latencies)))
    assert seeding.widest_fitting(scalings, fits) == 7  # 0.9 ms, after 4 measurements
    assert measured == [0, 6, 9, 7]  # measuring down the list would have needed 8
    measured.clear()
    assert seeding.widest_fitting(scalings, lambda i: fits(i) or True) == 0 and measured == [0]
    assert seeding.widest_fitting(scalings, fits, calls=3) == 9  # out of calls: the widest that fit
    assert seeding.widest_fitting(scalings, lambda i: False) is None
    assert seeding.widest_fitting([], fits) is None


def test_the_search_screens_with_the_latency_models_slack():
    assert choice.screening(Budget.parse("2ms,1MB"), 0.25) == Budget.parse("2.5ms,1MB")
    assert choice.screening(Budget.parse("1MB"), 0.25) == Budget.parse("1MB")
