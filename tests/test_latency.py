"""Latency datasets, kernel extraction, predictors, persistence, transfer, metrics and CLI."""

from __future__ import annotations

import copy
import json
import os
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from sklearn.ensemble import GradientBoostingRegressor

from autocomp import cli
from autocomp.errors import AutocompError
from autocomp.hardware import DeviceInfo, Measurement, Timing, get_device
from autocomp.latency import dataset as dataset_module
from autocomp.latency import generator, store
from autocomp.latency.dataset import (
    append_record,
    fastest_kernel_times,
    kernel_inputs,
    measure_generated,
    read_records,
)
from autocomp.latency.fit import cross_validated
from autocomp.latency.forest import Forest
from autocomp.latency.kernels import (
    FEATURE_NAMES,
    Kernel,
    Tensor,
    extract_kernels,
    feature_matrix,
    join_times,
    match_times,
)
from autocomp.latency.metrics import latency_metrics
from autocomp.latency.microbench import BenchTiming, benchmark_kernels
from autocomp.latency.predictors import (
    FORMAT_VERSION,
    ArchPredictor,
    KernelPredictor,
    LutPredictor,
    OutdatedPredictorError,
    load,
)
from autocomp.latency.store import load_predictor
from autocomp.latency.transfer import adapt
from autocomp.quant.qdq import quantizable_nodes, quantize_nodes

MACS = FEATURE_NAMES.index("macs")
INFO = DeviceInfo("cpu", "onnxruntime", "1.0", "Test CPU", 1, 1, "CPUExecutionProvider")


class FakeDevice:
    """Deterministic 'device': each kernel costs its MACs at 1 GMAC/s plus 2 µs."""

    def __init__(self, info: DeviceInfo = INFO, scale: float = 1.0):
        self.info, self.scale = info, scale

    def measure(self, onnx_model, input_shape, *, profile=False) -> Measurement:
        kernels = extract_kernels(onnx_model, tuple(input_shape))
        macs = feature_matrix(kernels)[:, 13]
        times = {
            k.name: float(self.scale * (m / 1e6 + 0.002))
            for k, m in zip(kernels, macs, strict=True)
        }
        total = sum(times.values()) + 0.01
        return Measurement(
            total,
            total,
            total,
            (total,),
            self.info.with_batch(input_shape[0]),
            times,
            {k.name: k.op for k in kernels},
        )


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch):
    """Generated models at 32x32 and at most 30 MMACs: fast to export, quantize and run."""
    monkeypatch.setattr(generator, "RESOLUTIONS", (32,))
    monkeypatch.setattr(generator, "MACS_RANGE", (1e5, 3e7))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lat") / "data.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generator, "RESOLUTIONS", (32,))
        mp.setattr(generator, "MACS_RANGE", (1e5, 3e7))
        measure_generated(FakeDevice(), 6, out, progress=False)
    return out


@pytest.mark.slow
def test_generator_is_deterministic_valid_onnx_with_requested_int8_layers():
    a, b = generator.generate(3, 1), generator.generate(3, 1)
    assert a.id == "gen-3-1" and a.config == b.config
    assert a.onnx_model.SerializeToString() == b.onnx_model.SerializeToString()
    fp32 = generator.export_onnx(generator.build_model(a.config), a.input_shape)
    names = quantizable_nodes(fp32)
    chosen = names[::2]
    mixed = quantize_nodes(fp32, chosen, input_shape=a.input_shape)
    onnx.checker.check_model(mixed)
    producers = {o: n.op_type for n in mixed.graph.node for o in n.output}
    for node in mixed.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            feeds = {producers.get(i) for i in node.input[:2]}
            assert (feeds == {"DequantizeLinear"}) == (node.name in chosen), node.name
    ops = [k.op for k in extract_kernels(mixed, a.input_shape)]
    int8_convs = sum(n.startswith("/") and "Conv" in n for n in chosen)
    assert ops.count("QLinearConv") == int8_convs


def test_quantize_unknown_node_is_refused():
    s = generator.generate(0, 0)
    with pytest.raises(AutocompError, match=r"^cannot quantize unknown node\(s\) 'nope'"):
        quantize_nodes(s.onnx_model, ["nope"], input_shape=s.input_shape)


@pytest.mark.slow
def test_dataset_append_resume_and_torn_tail(tmp_path):
    out = tmp_path / "d.jsonl"
    assert measure_generated(FakeDevice(), 1, out, progress=False) == 1
    assert measure_generated(FakeDevice(), 2, out, progress=False) == 1
    with out.open("a") as f:
        f.write('{"id": "gen-0-2", "median')  # a run killed mid-write
    assert [r["id"] for r in read_records(out)] == ["gen-0-0", "gen-0-1"]
    assert measure_generated(FakeDevice(), 3, out, progress=False) == 1
    assert [r["id"] for r in read_records(out)] == ["gen-0-0", "gen-0-1", "gen-0-2"]
    assert measure_generated(FakeDevice(), 3, out, progress=False) == 0
    other = FakeDevice(replace(INFO, threads=2))
    with pytest.raises(
        AutocompError,
        match=r"holds measurements for device profile .*_t1_b1, not "
        r".*_t2_b1; write to another file$",
    ):
        measure_generated(other, 5, out, progress=False)


def test_corrupt_dataset_line_is_refused(tmp_path):
    out = tmp_path / "d.jsonl"
    append_record(out, {"id": "a", "median_ms": 1.0})
    out.write_text("garbage\n" + out.read_text())
    with pytest.raises(AutocompError, match=r"d.jsonl:1: corrupt dataset line"):
        read_records(out)


def test_kernel_names_match_the_real_ort_profile():
    s = generator.generate(0, 5)
    dev = get_device("cpu", timing=Timing(warmup_runs=1, warmup_s=0, min_runs=3, min_s=0))
    m = dev.measure(s.onnx_model, s.input_shape, profile=True)
    kernels = extract_kernels(s.onnx_model, s.input_shape)
    assert [k.name for k in kernels] and {k.name for k in kernels} == set(m.node_times_ms)
    assert {k.name: k.op for k in kernels} == m.node_ops
    assert list(m.node_ops.values()) == [k.op for k in kernels]  # in run order (join_times)


def test_times_of_another_session_join_by_run_order():
    """ORT can swap the names of the nodes it inserts between two sessions of one model (two
    NCHWc reorders of different sizes): times must follow what ran, not the names."""

    def kernel(name: str, op: str, size: int) -> Kernel:
        return Kernel(name, op, "", (Tensor("float", (1, size)),), (Tensor("float", (1, size)),))

    kernels = [kernel("conv", "Conv", 8), kernel("ro", "ReorderOutput", 8)]
    kernels.append(kernel("ro_token_1", "ReorderOutput", 800))
    ran = [("conv", "Conv"), ("ro_token_1", "ReorderOutput"), ("ro", "ReorderOutput")]
    times = {"conv": 1.0, "ro_token_1": 0.01, "ro": 0.5}
    assert join_times(kernels, ran, times) == {"conv": 1.0, "ro": 0.01, "ro_token_1": 0.5}
    # Another sequence of ops (another build optimised the graph differently): by name.
    other = [("conv", "Conv"), ("ro", "ReorderOutput")]
    assert join_times(kernels, other, {"conv": 1.0, "ro": 0.5}) == {"conv": 1.0, "ro": 0.5}


def test_kernel_times_of_two_sessions_pair_the_same_computations():
    """A second session may rename the nodes ORT inserts *and* run parallel branches in the
    other order: the fastest time of each kernel must come from the same computation."""

    def conv(name: str, k: int) -> Kernel:
        x, y = Tensor("float", (1, 8, 16, 16)), Tensor("float", (1, 8, 8, 8))
        w = Tensor("float", (8, 8, k, k))
        return Kernel(name, "Conv", "", (x, w), (y,), {"kernel_shape": [k, k], "strides": [2, 2]})

    def reorder(name: str, size: int) -> Kernel:
        return Kernel(
            name,
            "ReorderOutput",
            "com.microsoft.nchwc",
            (Tensor("float", (1, size)),),
            (Tensor("float", (1, size)),),
        )

    first = [conv("body", 3), conv("shortcut", 1), reorder("ro", 8), reorder("ro_token_1", 800)]
    second = [conv("shortcut", 1), conv("body", 3), reorder("ro_token_2", 8), reorder("ro", 800)]
    t1 = {"body": 2.0, "shortcut": 0.30, "ro": 0.010, "ro_token_1": 0.50}
    t2 = {"shortcut": 0.25, "body": 2.2, "ro_token_2": 0.012, "ro": 0.40}
    assert match_times(first, second, t2) == {
        "body": 2.2,
        "shortcut": 0.25,
        "ro": 0.012,
        "ro_token_1": 0.40,
    }
    kernels, best = fastest_kernel_times([(first, t1), (second, t2)])
    assert kernels == first
    assert best == {"body": 2.0, "shortcut": 0.25, "ro": 0.010, "ro_token_1": 0.40}
    # A kernel the other session did not run keeps its own time.
    assert fastest_kernel_times([(first, t1), (second[:2], t2)])[1]["ro_token_1"] == 0.50


def test_features_give_the_matrix_product_each_group_runs():
    """A grouped convolution is several thin products (M = a group's output channels, N = output
    pixels, K = a group's inputs per output); a Gemm is one (M = outputs, N = rows, K = inputs)."""
    conv = Kernel(
        "g",
        "Conv",
        "",
        (Tensor("float", (1, 64, 32, 32)), Tensor("float", (88, 8, 7, 7))),
        (Tensor("float", (1, 88, 16, 16)),),
        {"group": 8, "kernel_shape": [7, 7], "strides": [2, 2]},
    )
    gemm = Kernel(
        "fc",
        "Gemm",
        "",
        (Tensor("float", (4, 256)), Tensor("float", (10, 256))),
        (Tensor("float", (4, 10)),),
    )
    columns = [FEATURE_NAMES.index(f"log_gemm_{d}") for d in "mnk"]
    shapes = 2 ** feature_matrix([conv, gemm])[:, columns] - 1
    np.testing.assert_allclose(shapes, [[11, 16 * 16, 8 * 7 * 7], [10, 4, 256]])
    assert feature_matrix([conv])[0, MACS] == 8 * 11 * 256 * 8 * 49


QUICK = Timing(warmup_runs=1, warmup_s=0, min_runs=3, min_s=0)


def test_benchmark_times_every_kernel_ort_executes():
    s = generator.generate(0, 5)
    fp32 = generator.export_onnx(generator.build_model(s.config), s.input_shape)
    mixed = quantize_nodes(fp32, quantizable_nodes(fp32)[::2], input_shape=s.input_shape)
    kernels, times = benchmark_kernels(mixed, s.input_shape, timing=BenchTiming(passes=1))
    # ORT numbers the nodes it creates per session, so compare what runs, not names.
    ran = [(k.op, k.outputs) for k in extract_kernels(mixed, s.input_shape)]
    assert [(k.op, k.outputs) for k in kernels] == ran
    assert set(times) == {k.name for k in kernels} and all(t > 0 for t in times.values())
    assert any(k.op == "QLinearConv" for k in kernels)  # int8 kernels are timed on their own
    measured = get_device("cpu", timing=QUICK).measure(mixed, s.input_shape).median_ms
    assert 0.2 < sum(times.values()) / measured < 5  # the same order as the whole model


def test_benchmarked_kernels_see_the_models_own_activations(monkeypatch):
    """ORT's uint8 MaxPool timed 1.7x faster on random 0/1 bytes than on a model's own
    activations: kernels are fed what the model computes, so quantized tensors span many levels."""
    from autocomp.latency import microbench

    s = generator.generate(0, 5)
    fp32 = generator.export_onnx(generator.build_model(s.config), s.input_shape)
    mixed = quantize_nodes(fp32, quantizable_nodes(fp32)[::2], input_shape=s.input_shape)
    fed = {}
    make_call = microbench._kernel_call

    def recording(node, kernel, optimized, weights, values, threads):
        fed.update(values)
        return make_call(node, kernel, optimized, weights, values, threads)

    monkeypatch.setattr(microbench, "_kernel_call", recording)
    benchmark_kernels(mixed, s.input_shape, timing=BenchTiming(passes=1))
    quantized = [v for v in fed.values() if v.dtype == np.uint8]
    assert quantized and all(len(np.unique(v)) > 2 for v in quantized)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts Linux threads")
def test_benchmark_keeps_one_kernel_session_alive(monkeypatch):
    """With several threads every session owns spinning workers: sessions left alive took the
    cores from the kernel being timed (a model's kernels summed to 3x the model at 2 threads)."""
    from autocomp.latency import microbench

    s = generator.generate(0, 5)
    threads_seen = []
    timed = microbench._time

    def counting(call, timing, clock):
        threads_seen.append(len(os.listdir("/proc/self/task")))
        return timed(call, timing, clock)

    monkeypatch.setattr(microbench, "_time", counting)
    before = len(os.listdir("/proc/self/task"))
    kernels, _ = benchmark_kernels(s.onnx_model, s.input_shape, threads=2, timing=BenchTiming(1))
    assert len(kernels) > 10 and len(threads_seen) == len(kernels) + 1
    assert max(threads_seen) <= before + 2  # one session's worker (+ slack), not one per kernel


def test_cpu_dataset_records_hold_kernel_benchmarks(tmp_path):
    out = tmp_path / "d.jsonl"
    measure_generated(get_device("cpu", timing=QUICK), 1, out, progress=False)
    (record,) = read_records(out)
    names = {k["name"] for k in record["kernels"]}
    assert set(record["kernel_times_ms"]) == names and "node_times_ms" not in record
    assert len(record["session_medians_ms"]) == dataset_module.SESSIONS
    assert record["median_ms"] == min(record["session_medians_ms"])
    assert not dataset_module.profiled([record])


def _conv(i: int, c: int, hw: int) -> Kernel:
    """An NCHWc 3x3 convolution ``c -> c`` channels at ``hw x hw``."""
    act = Tensor("float", (1, c, hw, hw))
    weight = Tensor("float", (c, c, 3, 3))
    attrs = {"kernel_shape": [3, 3], "strides": [1, 1], "group": 1}
    return Kernel(f"conv{i}", "Conv", "com.microsoft.nchwc", (act, weight), (act,), attrs)


def test_kernel_predictor_extrapolates_to_kernels_larger_than_any_seen():
    rng = np.random.default_rng(0)
    models, y, times = [], [], []
    for _ in range(40):  # convolutions of up to 64 channels at up to 16x16, at 50 GMAC/s
        ks = [_conv(i, int(rng.integers(1, 5)) * 16, int(rng.integers(4, 17))) for i in range(4)]
        t = {k.name: float(feature_matrix([k])[0, MACS] / 5e7 + 0.002) for k in ks}
        models.append(ks)
        times.append(t)
        y.append(sum(t.values()))
    kp = KernelPredictor(n_estimators=50, min_samples=5).fit(models, y, times)
    big = [_conv(0, 256, 56)]  # 200x the MACs of the largest training kernel
    expected = feature_matrix(big)[0, MACS] / 5e7
    assert abs(kp.predict_kernels(big)[0] / expected - 1) < 0.1


def test_forest_matches_sklearn():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((300, 4)), rng.standard_normal(300)
    forest = Forest.fit(X, y, n_estimators=20, max_depth=3, subsample=1.0)
    ref = GradientBoostingRegressor(
        n_estimators=20,
        max_depth=3,
        learning_rate=0.05,
        subsample=1.0,
        min_samples_leaf=3,
        random_state=0,
    ).fit(X, y)
    np.testing.assert_allclose(forest.predict(X), ref.predict(X), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_kernel_predictor_fits_synthetic_latency_and_round_trips(dataset, tmp_path):
    records = read_records(dataset)
    kp = KernelPredictor(n_estimators=50, min_samples=5, device=INFO).fit(
        *kernel_inputs(records[:4])
    )
    models, y, _ = kernel_inputs(records[4:])
    pred = kp.predict(models)
    assert np.all(np.abs(pred / y - 1) < 0.15)
    path = kp.save(tmp_path / "k.npz")
    again = load(path, INFO)
    np.testing.assert_array_equal(again.predict(models), pred)


def test_cross_validation_scores_a_dataset_against_itself(dataset):
    records = read_records(dataset)
    clean = cross_validated(records)
    assert clean["n"] == len(records) and clean["mape_pct"] < 15.0
    # A model measured twice as slow as its kernels say is one the others cannot predict: it
    # alone adds about 50% / n to the mean error.
    records[0] = {**records[0], "median_ms": 2 * records[0]["median_ms"]}
    assert cross_validated(records)["mape_pct"] > clean["mape_pct"] + 25.0 / len(records)


@pytest.mark.parametrize("cls", [ArchPredictor, LutPredictor])
def test_arch_predictors_learn_and_round_trip(cls, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 4, size=(400, 6)).astype(float)
    y = 1.0 + X @ np.array([0.5, 1.0, 0.2, 0.0, 0.3, 0.1])  # additive, like per-block latency
    p = cls(device=INFO).fit(X[:300], y[:300])
    assert latency_metrics(y[300:], p.predict(X[300:]))["within_10_pct"] >= 95
    again = load(p.save(tmp_path / "a.npz"), INFO)
    np.testing.assert_array_equal(again.predict(X[300:]), p.predict(X[300:]))


def _saved(tmp_path: Path) -> Path:
    X = np.arange(20, dtype=float).reshape(10, 2)
    return LutPredictor(device=INFO).fit(X, X.sum(1) + 1).save(tmp_path / "p.npz")


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AutocompError, match=r"^corrupt predictor file .*p.npz: not a readable npz"):
        load(path)
    bad = tmp_path / "bad.npz"
    with np.load(_saved(tmp_path)) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["table"] = arrays["table"] + 1.0
    np.savez(bad, **arrays)
    with pytest.raises(
        AutocompError, match=r"^corrupt predictor file .*bad.npz: checksum mismatch$"
    ):
        load(bad)
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("x.npy", b"not numpy")
    with pytest.raises(AutocompError, match=r"^corrupt predictor file .*bad.npz: no metadata$"):
        load(bad)


def _rewrite_version(path, version, out):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["__meta__"]))
    meta["version"] = version
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    np.savez(out, **arrays)
    return out


def test_wrong_version_and_wrong_profile_are_refused(tmp_path):
    path = _saved(tmp_path)
    old = _rewrite_version(path, FORMAT_VERSION + 1, tmp_path / "old.npz")
    with pytest.raises(AutocompError) as err:
        load(old)
    assert str(err.value) == (
        f"{old}: predictor format version {FORMAT_VERSION + 1} is not supported (this autocomp "
        f"reads version {FORMAT_VERSION}); refit it with 'autocomp predictor fit'"
    )
    other = replace(INFO, threads=4)
    with pytest.raises(AutocompError) as err:
        load_predictor(path, device_info=other)
    assert str(err.value) == (
        f"{path}: predictor was fitted for device profile {INFO.profile}, not {other.profile}; "
        "fit one for this device ('autocomp predictor fit') or let autocomp adapt one "
        "(load_predictor(..., device=...))"
    )


def test_unknown_profile_without_device_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    with pytest.raises(AutocompError, match=r"^no latency predictor for device profile nowhere_t9"):
        load_predictor("nowhere_t9")


@pytest.mark.slow
def test_transfer_recovers_a_faster_device(dataset):
    records = read_records(dataset)
    prior = KernelPredictor(n_estimators=50, min_samples=5, device=INFO).fit(
        *kernel_inputs(records)
    )
    fast = replace(INFO, threads=2)
    new = [  # the same models on a device where every kernel is twice as fast
        {
            **r,
            "median_ms": r["median_ms"] / 2,
            "device": fast.to_dict(),
            "node_times_ms": {n: t / 2 for n, t in r["node_times_ms"].items()},
        }
        for r in records
    ]
    adapted = adapt(prior, new[:3])
    assert adapted.device.profile == fast.profile
    models, y, _ = kernel_inputs(new[3:])
    assert np.all(np.abs(adapted.predict(models) / y - 1) < 0.1)
    assert np.all(prior.predict(models) / y > 1.7)


@pytest.mark.slow
def test_transfer_keeps_the_prior_where_it_already_fits(dataset):
    records = read_records(dataset)
    prior = KernelPredictor(n_estimators=50, min_samples=5, device=INFO).fit(
        *kernel_inputs(records)
    )
    # Another profile whose latencies are the prior's predictions up to 5% noise: a correction
    # could only fit the noise.
    other = replace(INFO, batch=4)
    models = kernel_inputs(records)[0]
    rng = np.random.default_rng(0)
    noisy = []
    for r, p in zip(records, prior.predict(models), strict=True):
        f = p / r["median_ms"]
        noisy.append(
            {
                **r,
                "median_ms": p * np.exp(rng.normal(0, 0.05)),
                "device": other.to_dict(),
                "node_times_ms": {
                    n: t * f * np.exp(rng.normal(0, 0.05)) for n, t in r["node_times_ms"].items()
                },
            }
        )
    adapted = adapt(prior, noisy)
    assert adapted.device.profile == other.profile
    np.testing.assert_array_equal(adapted.predict(models), prior.predict(models))


def test_transfer_to_another_batch_refits_on_both_measurement_sets(dataset):
    records = read_records(dataset)
    prior = KernelPredictor(n_estimators=50, min_samples=5, device=INFO).fit(
        *kernel_inputs(records)
    )

    def on(info, scale):
        return [
            {
                **r,
                "median_ms": scale * r["median_ms"],
                "device": info.to_dict(),
                "node_times_ms": {n: scale * t for n, t in r["node_times_ms"].items()},
            }
            for r in records[:3]
        ]

    batch2 = on(replace(INFO, batch=2), 1.5)
    pooled = adapt(prior, batch2, records)
    assert pooled.device.profile == replace(INFO, batch=2).profile
    expected = KernelPredictor(n_estimators=50, min_samples=5).fit(
        *kernel_inputs([*records, *batch2])
    )
    models = kernel_inputs(records)[0]
    for ks in models:  # the kernel regressors are those of one fit on both sets
        np.testing.assert_allclose(pooled.predict_kernels(ks), expected.predict_kernels(ks))
    assert not np.allclose(pooled.predict(models), prior.predict(models))
    # Another thread count is pooled too, each kernel row carrying its model's threads ...
    two = replace(INFO, threads=2)
    threads2 = on(two, 0.5)
    pooled2 = adapt(prior, threads2, records)
    assert pooled2.device.profile == two.profile
    expected2 = KernelPredictor(n_estimators=50, min_samples=5, device=two).fit(
        *kernel_inputs([*records, *threads2]), threads=[1] * len(records) + [2] * 3
    )
    for ks in models:
        np.testing.assert_allclose(pooled2.predict_kernels(ks), expected2.predict_kernels(ks))
    # ... so the same kernels are predicted faster on 2 threads than on 1 by the one fit.
    one = copy.deepcopy(pooled2)
    one.device = INFO
    assert np.median(pooled2.predict_kernels(models[0]) / one.predict_kernels(models[0])) < 0.8
    # Another CPU is corrected, not pooled: kernel features cannot tell it apart.
    elsewhere = on(replace(INFO, processor="Other CPU"), 1.5)
    np.testing.assert_array_equal(
        adapt(prior, elsewhere, records).predict(models), adapt(prior, elsewhere).predict(models)
    )


def test_pooled_transfer_refits_how_kernels_add_up_where_that_validates(dataset):
    """A per-model cost the kernels do not explain (here the models take twice their kernels'
    time) is the new profile's own: the per-model part is refitted on the new measurements, not
    left at the pooled fit's, which the prior's models dominate."""
    records = read_records(dataset)
    prior = KernelPredictor(n_estimators=50, min_samples=5, device=INFO).fit(
        *kernel_inputs(records)
    )
    info = replace(INFO, batch=2)
    slower = [{**r, "median_ms": 2 * r["median_ms"], "device": info.to_dict()} for r in records]
    models, y, _ = kernel_inputs(slower)
    adapted = adapt(prior, slower, records)
    pooled = KernelPredictor(n_estimators=50, min_samples=5).fit(
        *kernel_inputs([*records, *slower])
    )
    for ks in models:
        np.testing.assert_allclose(adapted.predict_kernels(ks), pooled.predict_kernels(ks))
    error = np.abs(np.log(adapted.predict(models) / y)).mean()
    assert error < 0.5 * np.abs(np.log(pooled.predict(models) / y)).mean()


def test_metrics_by_hand():
    m = latency_metrics([10, 20, 30, 40], [10.4, 21.5, 36, 38])
    assert m["n"] == 4
    assert m["within_5_pct"] == 50.0  # 4% and 5% errors
    assert m["within_10_pct"] == 75.0  # plus 7.5%; 20% is out
    assert m["rmse_ms"] == pytest.approx(np.sqrt((0.16 + 2.25 + 36 + 4) / 4))
    assert m["mape_pct"] == pytest.approx(100 * (0.04 + 0.075 + 0.2 + 0.05) / 4)
    assert m["kendall_tau"] == 1.0


@pytest.mark.slow
def test_cli_fit_eval_predict(dataset, tmp_path, capsys):
    pred = tmp_path / "lut.npz"
    fit = ["predictor", "fit", "--data", str(dataset), "--kind", "lut", "--out", str(pred)]
    assert cli.main([*fit, "--cross-validate", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 6 and pred.is_file()
    # Each model predicted by a table fitted on the other five: the same numbers as by hand.
    assert summary["cross_validated"] == cross_validated(read_records(dataset), "lut")
    assert summary["cross_validated"]["within_10_pct"] < 100.0  # six models pin little down
    assert (
        cli.main(["predictor", "eval", "--predictor", str(pred), "--data", str(dataset), "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {
        "predictor",
        "kind",
        "profile",
        "data",
        "n",
        "within_5_pct",
        "within_10_pct",
        "rmse_ms",
        "mape_pct",
        "kendall_tau",
    }
    assert out["n"] == 6 and out["kind"] == "lut" and out["profile"] == INFO.profile
    model = tmp_path / "m.onnx"
    onnx.save(generator.generate(0, 1).onnx_model, model)
    assert cli.main(["predictor", "predict", "--predictor", str(pred), "--model", str(model)]) == 2
    assert "a lut predictor predicts search-space encodings" in capsys.readouterr().err


@pytest.mark.slow
def test_load_predictor_adapts_a_new_profile_once_and_caches_it(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    monkeypatch.setattr(store, "TRANSFER_SAMPLES", 3)
    prior = KernelPredictor(n_estimators=20, min_samples=5, device=INFO).fit(
        *kernel_inputs(read_records(dataset))
    )
    prior_path = prior.save(tmp_path / "prior.npz")
    monkeypatch.setattr(store, "default_predictor_path", lambda info=None: prior_path)
    device = FakeDevice(replace(INFO, processor="Other CPU"), scale=0.5)
    adapted = load_predictor(device=device, progress=False)
    cached = tmp_path / "predictors" / device.info.profile / "kernel.npz"
    assert adapted.device.profile == device.info.profile and cached.is_file()
    assert len(read_records(cached.with_name("measurements.jsonl"))) == 3
    device.measure = None  # a second load must not measure again
    again = load_predictor(device=device)
    models, _, _ = kernel_inputs(read_records(dataset))
    np.testing.assert_array_equal(again.predict(models), adapted.predict(models))
    # Adapted by an older autocomp: refused without the device, readapted from the cached
    # measurements (still without measuring) with it.
    _rewrite_version(cached, FORMAT_VERSION - 1, cached)
    with pytest.raises(OutdatedPredictorError, match="predictor format version"):
        load_predictor(device.info.profile)
    readapted = load_predictor(device=device, progress=False)
    np.testing.assert_array_equal(readapted.predict(models), adapted.predict(models))
    assert load(cached).device.profile == device.info.profile  # the cache holds it again


def test_adapting_to_another_batch_pools_the_shipped_measurements(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(store, "TRANSFER_SAMPLES", 3)
    shipped = read_records(dataset)
    prior = KernelPredictor(n_estimators=20, min_samples=5, device=INFO).fit(
        *kernel_inputs(shipped)
    )
    (tmp_path / "shipped").mkdir()
    prior_path = prior.save(tmp_path / "shipped" / "kernel.npz")
    (tmp_path / "shipped" / store.DATA_FILE).write_bytes(Path(dataset).read_bytes())
    monkeypatch.setattr(store, "default_predictor_path", lambda info=None: prior_path)
    adapted = load_predictor(device=FakeDevice(INFO, scale=2.0), batch=2, progress=False)
    assert adapted.device.profile == INFO.with_batch(2).profile
    measured = read_records(
        tmp_path / "cache" / "predictors" / INFO.with_batch(2).profile / store.DATA_FILE
    )
    pooled = KernelPredictor(n_estimators=20, min_samples=5).fit(
        *kernel_inputs([*shipped, *measured])
    )
    for ks in kernel_inputs(measured)[0]:
        np.testing.assert_allclose(adapted.predict_kernels(ks), pooled.predict_kernels(ks))


@pytest.mark.parametrize("profile", store.builtin_profiles())
def test_shipped_predictor_matches_its_folder_and_predicts(profile):
    path = store.builtin_dir() / profile / store.PREDICTOR_FILE
    predictor = load(path)
    assert isinstance(predictor, KernelPredictor)
    assert predictor.device.profile == profile
    assert (path.parent / "provenance.json").is_file()
    s = generator.generate(0, 2)
    assert 0 < predictor.predict_onnx(s.onnx_model, s.input_shape) < 1000


def test_a_shipped_predictor_wins_over_an_adaptation_cached_before_it_shipped(
    tmp_path, monkeypatch
):
    for root in ("shipped", "cache"):
        (tmp_path / root / INFO.profile).mkdir(parents=True)
        (tmp_path / root / INFO.profile / store.PREDICTOR_FILE).write_bytes(root.encode())
    monkeypatch.setattr(store, "builtin_dir", lambda: tmp_path / "shipped")
    monkeypatch.setattr(store, "cache_dir", lambda: tmp_path / "cache")
    assert store.find_predictor(INFO.profile).read_bytes() == b"shipped"
    other = replace(INFO, threads=2).profile
    (tmp_path / "cache" / other).mkdir()
    (tmp_path / "cache" / other / store.PREDICTOR_FILE).write_bytes(b"cache")
    assert store.find_predictor(other).read_bytes() == b"cache"


def test_transfer_prior_is_the_shipped_predictor_of_the_same_processor(tmp_path, monkeypatch):
    """Transfer to 2 threads on a host with a shipped 1-thread predictor pools that one's
    measurements; on an unknown host the prior is the shipped predictor whose own data
    cross-validate best, whatever its name."""
    mine, other = replace(INFO, processor="CPU B"), replace(INFO, processor="CPU A")
    for info, cv in ((other, 60.0), (mine, 80.0), (replace(mine, threads=4), 90.0)):
        (tmp_path / info.profile).mkdir()
        (tmp_path / info.profile / store.PREDICTOR_FILE).write_bytes(b"")
        provenance = {"cross_validated_5_fold": {"within_10_pct": cv}}
        (tmp_path / info.profile / "provenance.json").write_text(json.dumps(provenance))
    monkeypatch.setattr(store, "builtin_dir", lambda: tmp_path)
    chosen = store.default_predictor_path(replace(mine, threads=2, batch=4))
    assert chosen == tmp_path / mine.profile / store.PREDICTOR_FILE
    best = tmp_path / mine.profile / store.PREDICTOR_FILE  # 80% against CPU A's 60%
    assert store.default_predictor_path(replace(INFO, processor="CPU C")) == best
    assert store.default_predictor_path() == best
    (tmp_path / mine.profile / "provenance.json").write_text("{}")  # unknown: ranked last
    first = tmp_path / other.profile / store.PREDICTOR_FILE
    assert store.default_predictor_path(replace(INFO, processor="CPU C")) == first
    # Its own processor's predictor serves a host even where another's data are cleaner.
    assert store.default_predictor_path(replace(mine, threads=2)) == best


def test_dataset_times_models_in_passes_and_keeps_each_kernels_fastest_time(tmp_path, monkeypatch):
    """Sessions of one model lie a pass apart (a slow stretch of the host hits one of them), and
    kernels are matched across benchmarks by what they compute, as ORT may rename the nodes it
    inserts and change the order it runs them in."""
    real_bench = dataset_module.benchmark_kernels
    order: list[int] = []
    first_run: dict[int, list[Kernel]] = {}

    def bench(model, shape, *, threads):
        order.append(id(model))
        second = id(model) in first_run
        if second:  # the same kernels, renamed and run in the reverse order
            kernels = [replace(k, name=f"{k.name}_renamed") for k in first_run[id(model)][::-1]]
        else:
            kernels = first_run[id(model)] = real_bench(model, shape, threads=threads)[0]
        # Each kernel is slow in one of its two sessions: 2 ms there, 1 ms in the other.
        slow = {k.name: zlib.crc32(repr((k.op, k.inputs, k.outputs)).encode()) % 2 for k in kernels}
        return kernels, {k.name: 2.0 if slow[k.name] == second else 1.0 for k in kernels}

    monkeypatch.setattr(dataset_module, "benchmark_kernels", bench)
    out = tmp_path / "d.jsonl"
    measure_generated(get_device("cpu", timing=QUICK), 2, out, progress=False)
    first, second = read_records(out)
    assert order[:2] == order[2:] and order[0] != order[1]  # A, B, then A, B again
    for record in (first, second):
        assert set(record["kernel_times_ms"].values()) == {1.0}
        assert {k["name"] for k in record["kernels"]} == set(record["kernel_times_ms"])


def test_user_models_join_a_dataset_once(tmp_path):
    path = tmp_path / "net.onnx"
    sample = generator.generate(0, 3)
    onnx.save(sample.onnx_model, path)
    out = tmp_path / "d.jsonl"
    device = get_device("cpu", timing=QUICK)
    assert dataset_module.measure_files(device, [path], out, progress=False) == 1
    assert dataset_module.measure_files(device, [path], out, progress=False) == 0
    (record,) = read_records(out)
    assert record["id"].startswith("file-") and record["id"].endswith("-b1")
    assert record["source"] == {"file": str(path), "name": "net"}
    assert record["input_shape"] == list(sample.input_shape)
    assert len(record["session_medians_ms"]) == dataset_module.SESSIONS
