"""Local devices measure truthfully and refuse bad input with one-line errors."""

import json
import re
import time
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx_models import conv_net, embedding, fails_at_run, two_inputs

from autocomp import cli, hardware
from autocomp.errors import AutocompError
from autocomp.hardware import Timing, get_device, load_onnx, ort_device, static_input_shape
from autocomp.hardware.ort_device import OrtDevice, node_times
from autocomp.hardware.reference import calibration_path, nominal_ms, scaled
from autocomp.hardware.timing import (
    BLOCK,
    cpu_model,
    steady,
    summarize,
    time_alternating,
    time_runs,
)
from autocomp.hardware.torch_device import NO_CUDA, TorchDevice

#: Quick but still honest timing for tests: 30 samples of one session after a short warm-up.
FAST = Timing(warmup_runs=3, warmup_s=0.0, min_runs=30, min_s=0.05, max_runs=300, sessions=1)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "conv.onnx"
    onnx.save(conv_net(), path)
    return path


def _check_stats(m: hardware.Measurement, min_samples: int = 30, sessions: int = 1) -> None:
    assert len(m.samples) >= min_samples
    assert all(s > 0 for s in m.samples)
    assert m.p10_ms <= m.median_ms <= m.p90_ms
    if sessions == 1:  # several: see test_default_timing_splits_the_runs_over_fresh_sessions
        assert m.median_ms == pytest.approx(float(np.median(steady(list(m.samples)))))
    assert m.p10_ms == pytest.approx(min(m.median_ms, float(np.percentile(m.samples, 10))))
    assert m.p90_ms == pytest.approx(max(m.median_ms, float(np.percentile(m.samples, 90))))


def test_cpu_measures_a_model_file(model_path):
    m = OrtDevice(timing=FAST).measure(model_path, (1, 3, 32, 32))
    _check_stats(m)
    assert m.node_times_ms is None and m.node_ops is None
    info = m.info
    assert (info.kind, info.runtime, info.provider) == (
        "cpu",
        "onnxruntime",
        "CPUExecutionProvider",
    )
    assert (info.threads, info.batch) == (1, 1)
    assert info.precisions == ("fp32", "int8")
    assert info.runtime_version == __import__("onnxruntime").__version__


def test_default_timing_splits_the_runs_over_fresh_sessions(monkeypatch):
    sessions = []
    time_session = OrtDevice._time_session

    def spy(self, source, shape):
        sessions.append(time_session(self, source, shape))
        return sessions[-1]

    monkeypatch.setattr(OrtDevice, "_time_session", spy)
    m = get_device("cpu").measure(conv_net(), (1, 3, 32, 32))
    defaults = Timing()
    assert len(sessions) == defaults.sessions == 3
    assert m.samples == tuple(t for runs in sessions for t in runs)
    # The median of the sessions' steady medians; the tails over every sample.
    assert m.median_ms == pytest.approx(float(np.median([np.median(steady(s)) for s in sessions])))
    assert m.p10_ms == pytest.approx(min(m.median_ms, float(np.percentile(m.samples, 10))))
    # Each session makes its share: min_s / 3 seconds of samples, or its share of the run cap.
    share = defaults.per_session()
    assert (share.min_runs, share.max_runs, share.sessions) == (10, 667, 1)
    for runs in sessions:
        assert len(runs) >= share.min_runs
        assert sum(runs) / 1e3 >= defaults.min_s / 3 or len(runs) == share.max_runs


def test_the_median_leaves_out_bursts_of_interference_but_not_the_tail():
    quiet, burst = [1.0, 1.01, 0.99, 1.02, 0.98] * (BLOCK // 5), [1.3] * BLOCK
    runs = quiet * 4 + burst * 3 + quiet * 2  # 3 of 9 blocks slowed by a neighbour by 30%
    assert np.median(runs) == pytest.approx(1.01)  # the plain median is pulled up
    median, p10, p90 = summarize(runs)
    assert median == pytest.approx(1.0) and p10 == pytest.approx(0.98)
    assert p90 == pytest.approx(1.3)  # the disturbed runs still show in the tail
    assert len(steady(runs)) == 6 * BLOCK
    assert list(steady(burst * 2)) == burst * 2  # too short to tell: everything counts
    assert summarize(quiet * 5)[0] == pytest.approx(float(np.median(quiet * 5)))


def test_clock_is_thread_cpu_time_only_when_the_work_is_in_the_calling_thread():
    assert OrtDevice().info.extra["clock"] == "thread"
    assert OrtDevice(2).info.extra["clock"] == "wall"
    assert OrtDevice(timing=Timing(clock="wall")).info.extra["clock"] == "wall"
    assert TorchDevice().info.extra["clock"] == "thread"
    with pytest.raises(AutocompError, match="unknown clock 'cpu'; use 'auto', 'wall' or 'thread'"):
        Timing(clock="cpu")
    with pytest.raises(AutocompError, match="sessions must be at least 1, got 0"):
        Timing(sessions=0)


def test_time_runs_counts_and_clocks():
    quick = Timing(warmup_runs=2, warmup_s=0.0, min_runs=30, min_s=0.0, max_runs=100)
    calls = []
    samples = time_runs(lambda: calls.append(time.sleep(0.002)), quick, clock="wall")
    assert len(samples) == 30 and len(calls) == 32  # two warm-up runs, not timed
    assert min(samples) >= 2.0
    # Sleeping is not work: the thread's CPU clock does not count it.
    assert max(time_runs(lambda: time.sleep(0.002), quick, clock="thread")) < 1.0
    capped = Timing(warmup_runs=1, warmup_s=0.0, min_runs=30, min_s=10.0, max_runs=50)
    assert len(time_runs(lambda: None, capped)) == 50


def test_reference_blocks_alternate_with_the_model_and_scale_it_to_the_calibrated_speed():
    calls = []
    quick = Timing(warmup_runs=2, warmup_s=0.0, min_runs=6, min_s=0.0)
    samples, reference = time_alternating(
        lambda: calls.append("m"), lambda: calls.append("r"), quick, clock="wall"
    )
    assert "".join(calls) == "mm" + "rr" + "mmmrrr" * 2  # warm-ups, then blocks of three
    assert len(samples) == len(reference) == 6
    # The host runs twice as slow during the second block: the reference sees it too.
    model, ref = [2.0, 2.1, 1.9, 4.0, 4.2, 3.8], [1.0, 1.1, 1.2, 2.0, 2.2, 2.4]
    np.testing.assert_allclose(scaled(model, ref, nominal=1.0), [2.0, 2.1, 1.9] * 2)


def test_reference_timing_reads_its_calibration_from_the_cache(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ort_device, "CALIBRATION_TIMING", FAST)
    timing = replace(FAST, reference=True)
    first = OrtDevice(timing=timing).measure(model_path, (1, 3, 32, 32))
    assert first.info.extra == {"clock": "thread", "timing": "reference"}
    path = calibration_path(first.info.profile)
    calibration = json.loads(path.read_text())
    assert calibration["nominal_ms"] > 0
    # A host calibrated at half the speed: the same model reads about twice as slow.
    path.write_text(json.dumps({**calibration, "nominal_ms": 2 * calibration["nominal_ms"]}))
    again = OrtDevice(timing=timing).measure(model_path, (1, 3, 32, 32))
    assert 1.4 < again.median_ms / first.median_ms < 2.8
    path.write_text("{not json")
    with pytest.raises(AutocompError, match=r"unreadable reference calibration .*delete it"):
        nominal_ms(first.info.profile, b"model", lambda: 1.0)
    with pytest.raises(AutocompError, match="reference timing needs the thread clock"):
        OrtDevice(2, timing=timing)


def test_batch_and_threads_reach_the_profile():
    m = OrtDevice(2, timing=FAST).measure(conv_net(batch="n").SerializeToString(), (4, 3, 32, 32))
    assert (m.info.batch, m.info.threads) == (4, 2)
    assert m.info.profile.endswith("_t2_b4")
    assert m.info.profile == get_device("cpu", threads=2).info.with_batch(4).profile


def test_profile_key_is_stable_and_filesystem_safe():
    a, b = get_device("cpu").info, get_device("cpu").info
    assert a == b and a.profile == b.profile
    assert a.profile.startswith(f"cpu_onnxruntime-{a.runtime_version}_{a.machine}_")
    assert a.profile.endswith("_t1_b1")
    assert re.fullmatch(r"[A-Za-z0-9_.+-]+", a.profile)
    assert get_device("cpu", threads=3).info.profile != a.profile
    assert hardware.DeviceInfo.from_dict(a.to_dict()) == a


def test_cpus_that_share_a_name_get_different_profiles():
    def x86(model: str) -> str:
        block = (
            f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: {model}\n"
        )
        block += "model name\t: AMD EPYC\nstepping\t: 1\n"
        return "\n".join(block.format(i) for i in range(2))

    assert cpu_model(x86("2")) == "AMD EPYC (family 26, model 2, stepping 1)"
    info = get_device("cpu").info
    profiles = {replace(info, processor=cpu_model(x86(m))).profile for m in ("1", "2")}
    assert len(profiles) == 2
    # ARM kernels name the board after the processors' blocks and report no family.
    arm = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n\nModel\t\t: Raspberry Pi 4\n"
    assert cpu_model(arm) == "Raspberry Pi 4"


def test_profile_gives_node_times_of_executed_nodes():
    m = OrtDevice(timing=FAST).measure(conv_net(), (1, 3, 32, 32), profile=True)
    _check_stats(m)
    assert m.node_times_ms and m.node_ops
    assert set(m.node_times_ms) == set(m.node_ops)
    assert all(t > 0 for t in m.node_times_ms.values())
    # Two convolutions in the graph (the Relu may be fused into the first): two conv kernels ran.
    convs = [name for name, op in m.node_ops.items() if op in ("Conv", "FusedConv")]
    assert len(convs) == 2
    assert "Conv" in m.node_ops.values() or "FusedConv" in m.node_ops.values()


def test_node_times_from_a_trace():
    def event(cat, name, ts, dur, op=None):
        return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"op_name": op}}

    trace = [
        event("Session", "session_initialization", 0, 50),
        event("Node", "conv_kernel_time", 101, 500, "Conv"),  # run 0: warm-up, dropped
        event("Session", "model_run", 100, 600),
        event("Node", "conv_kernel_time", 1001, 100, "Conv"),
        event("Node", "loop_body_kernel_time", 1110, 20, "Add"),
        event("Node", "loop_body_kernel_time", 1140, 30, "Add"),  # same run: summed
        event("Session", "model_run", 1000, 200),
        event("Node", "conv_kernel_time", 2001, 300, "Conv"),
        event("Node", "loop_body_kernel_time", 2310, 10, "Add"),
        event("Session", "model_run", 2000, 400),
        event("Node", "conv_kernel_time", 3001, 200, "Conv"),
        event("Session", "model_run", 3000, 300),
        {"cat": "Node", "name": "broken_kernel_time", "ts": "x", "dur": 1},
        "not an event",
    ]
    times, ops = node_times(trace, skip_runs=1)
    assert times == pytest.approx({"conv": 0.2, "loop_body": 0.03})  # medians in ms
    assert ops == {"conv": "Conv", "loop_body": "Add"}
    with pytest.raises(AutocompError, match="not a list of trace events"):
        node_times({"traceEvents": []})


def test_integer_inputs_get_valid_random_indices():
    m = OrtDevice(timing=FAST).measure(embedding(), (1, 8))
    _check_stats(m)


@pytest.mark.parametrize(
    ("model", "shape", "message"),
    [
        (
            conv_net(),
            (1, 3, 31, 32),
            "input shape 1,3,31,32 does not fit the model's input 'x' of shape (1,3,32,32)",
        ),
        (
            conv_net(),
            (1, 3, 32),
            "input shape 1,3,32 does not fit the model's input 'x' of shape (1,3,32,32)",
        ),
        (
            two_inputs(),
            (1, 4),
            "the model has 2 inputs (a, b); only single-input models can be measured",
        ),
    ],
)
def test_inputs_that_do_not_fit_are_refused(model, shape, message):
    with pytest.raises(AutocompError) as err:
        OrtDevice(timing=FAST).measure(model, shape)
    assert str(err.value) == message


def test_a_model_that_fails_at_run_time_is_a_one_line_error():
    with pytest.raises(AutocompError) as err:
        OrtDevice(timing=FAST).measure(fails_at_run(), (1, 3, 32, 32))
    text = str(err.value)
    assert text.startswith("the model failed to run: ") and "Reshape" in text
    assert "\n" not in text and len(text) <= 330


def test_load_onnx_accepts_valid_and_refuses_invalid_files(tmp_path, model_path):
    assert load_onnx(model_path).graph.name == "conv_net"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"definitely not protobuf \xff\xfe")
    missing = tmp_path / "missing.onnx"
    broken = tmp_path / "broken.onnx"
    model = conv_net()
    model.graph.node[1].input[0] = "nowhere"  # Relu reads a tensor nobody produces
    broken.write_bytes(model.SerializeToString())
    for path in (garbage, missing, broken):
        with pytest.raises(AutocompError) as err:
            load_onnx(path)
        text = str(err.value)
        assert text.startswith(f"not a valid ONNX model: {path} (") and text.endswith(")")
        assert "\n" not in text


def test_static_input_shape():
    assert static_input_shape(conv_net(), "m.onnx") == (1, 3, 32, 32)
    with pytest.raises(AutocompError) as err:
        static_input_shape(conv_net(batch="n"), "m.onnx")
    assert str(err.value) == (
        "m.onnx: input 'x' has dynamic shape (n,3,32,32); pass --input-shape, "
        "e.g. --input-shape 1,3,224,224"
    )
    with pytest.raises(AutocompError, match=r"has 2 inputs \(a, b\); only single-input"):
        static_input_shape(two_inputs(), "m.onnx")


@pytest.mark.parametrize("spec", ["tpu", "gpu", "cuda:x", "cuda:-1", "CPU", ""])
def test_unknown_device_specs(spec):
    with pytest.raises(AutocompError) as err:
        get_device(spec)
    assert str(err.value) == (
        f"unknown device {spec!r}; use 'cpu', 'torch-cpu', 'cuda', 'cuda:N' or 'remote://HOST:PORT'"
    )


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(AutocompError) as err:
            get_device(spec)
        assert str(err.value) == NO_CUDA
    rows = {row["spec"]: row for row in hardware.available_devices()}
    if "cuda" in rows:
        assert rows["cuda"] == {"spec": "cuda", "available": False, "reason": NO_CUDA, "info": None}


def test_onnx_on_cuda_needs_onnxruntime_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        "onnxruntime.get_available_providers", lambda: ["CPUExecutionProvider"], raising=True
    )
    with pytest.raises(AutocompError, match=r"no GPU cuda:1 here \(this machine has 1\)"):
        get_device("cuda:1")
    with pytest.raises(AutocompError) as err:
        get_device("cuda").measure(conv_net(), (1, 3, 32, 32))
    assert str(err.value) == (
        "ONNX models on cuda run with ONNX Runtime's CUDAExecutionProvider, which this "
        "onnxruntime build lacks (install onnxruntime-gpu), or measure the nn.Module instead"
    )


def test_torch_cpu_times_modules_and_leaves_them_as_they_were():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    net.train()
    threads = torch.get_num_threads()
    device = TorchDevice(timing=FAST)
    m = device.measure(net, (2, 3, 16, 16))
    _check_stats(m)
    assert (m.info.kind, m.info.runtime, m.info.provider) == ("torch-cpu", "torch", "torch-eager")
    assert (m.info.batch, m.info.threads) == (2, 1)
    assert m.info.runtime_version == torch.__version__
    assert net.training and net[1].num_batches_tracked.item() == 0  # not run in train mode
    assert torch.get_num_threads() == threads
    with pytest.raises(AutocompError, match=r"torch-cpu times nn\.Modules; measure ONNX models"):
        device.measure(conv_net(), (1, 3, 32, 32))
    with pytest.raises(AutocompError, match="per-node profiles come from ONNX Runtime"):
        device.measure(net, (1, 3, 16, 16), profile=True)
    with pytest.raises(AutocompError, match="the model failed to run: "):
        device.measure(net, (1, 5, 16, 16))


def test_available_devices_lists_every_kind():
    rows = hardware.available_devices()
    specs = [row["spec"] for row in rows]
    assert specs[:2] == ["cpu", "torch-cpu"] and specs[-1] == "remote://HOST:PORT"
    assert any(s.startswith("cuda") for s in specs)
    cpu = rows[0]
    assert cpu["available"] and cpu["reason"] is None
    assert cpu["info"]["profile"] == get_device("cpu").info.profile
    for row in rows:
        assert set(row) == {"spec", "available", "reason", "info"}
        assert row["available"] == (row["reason"] is None)
    assert "autocomp device serve" in rows[-1]["reason"]


def test_cli_measure_prints_a_summary(model_path, capsys):
    assert cli.main(["measure", "--model", str(model_path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert re.fullmatch(
        r"cpu \(.+, 1 thread\(s\), batch 1\): median \d+\.\d{3} ms, p10 \d+\.\d{3} ms, "
        r"p90 \d+\.\d{3} ms over \d+ runs\n",
        out,
    )


def test_cli_measure_json_and_profile(model_path, capsys):
    argv = ["measure", "--model", str(model_path), "--json", "--profile", "--threads", "2"]
    assert cli.main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    m = hardware.Measurement.from_dict(data)
    _check_stats(m, sessions=Timing().sessions)
    assert m.info.threads == 2 and data["info"]["profile"].endswith("_t2_b1")
    assert "Conv" in data["node_ops"].values()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "{tmp}/missing.onnx"], "model file not found: {tmp}/missing.onnx"),
        (["--model", "{tmp}/garbage.onnx"], "not a valid ONNX model: {tmp}/garbage.onnx ("),
        (["--model", "{tmp}/dynamic.onnx"], "input 'x' has dynamic shape (n,3,32,32)"),
        (["--model", "{tmp}/conv.onnx", "--device", "tpu"], "unknown device 'tpu'"),
        (["--model", "{tmp}/conv.onnx", "--input-shape", "1,3,8,8"], "does not fit"),
        (
            ["--model", "{tmp}/conv.onnx", "--reference", "--device", "torch-cpu"],
            "--reference times on the local cpu device only",
        ),
        (
            ["--generate", "2", "--out", "{tmp}/d.jsonl", "--reference", "--device", "torch-cpu"],
            "--reference times on the local cpu device only",
        ),
    ],
)
def test_cli_measure_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    onnx.save(conv_net(), tmp_path / "conv.onnx")
    onnx.save(conv_net(batch="n"), tmp_path / "dynamic.onnx")
    (tmp_path / "garbage.onnx").write_text("garbage")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(["measure", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("autocomp: error: ")
    assert message.format(tmp=tmp_path) in err


def test_cli_devices_json(capsys):
    assert cli.main(["devices", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["spec"] == "cpu" and rows[0]["available"] is True
