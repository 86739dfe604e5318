"""SpaceLatency: the search's latency model, fitted from (here: synthetic) device measurements."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from tiny_spaces import tiny_space

from autocomp.hardware.base import DeviceInfo, Measurement
from autocomp.latency.space import MAX_SLACK, PASSES, SpaceLatency, default_cache
from autocomp.spaces import Candidate

INFO = DeviceInfo("cpu", "onnxruntime", "0", "test-cpu", 1, 1, "CPUExecutionProvider")


class FakeDevice:
    """Latency = 1e-5 ms per MAC of the candidate named by the 'model' bytes; counts calls."""

    info = INFO

    def __init__(self, space):
        self.space = space
        self.calls = 0

    def measure(self, onnx_model, input_shape, *, profile=False):
        from autocomp.spaces import Candidate

        self.calls += 1
        ms = 1e-5 * self.space.cost(Candidate.from_dict(json.loads(onnx_model))).macs
        return Measurement(ms, ms, ms, (ms,), self.info)


def to_onnx(candidate):
    return json.dumps(candidate.to_dict()).encode(), (1, 3, candidate.resolution, 16)


@pytest.fixture
def space(tmp_path):
    return tiny_space("mbv3", tmp_path)


def test_fit_measures_once_then_reuses_the_cache(space, tmp_path):
    device = FakeDevice(space)
    cache = tmp_path / "cache.jsonl"
    model = SpaceLatency.fit(space, device, to_onnx, 20, cache=cache, progress=False)
    first = device.calls
    records = len(cache.read_text().splitlines())
    assert records >= 20  # the sampled candidates plus the two extremes, duplicates dropped
    assert first == PASSES * records
    again = SpaceLatency.fit(space, device, to_onnx, 20, cache=cache, progress=False)
    assert device.calls == first  # nothing measured twice
    rng = np.random.default_rng(1)
    probe = [space.sample(rng) for _ in range(5)]
    assert np.allclose(model.predict(probe), again.predict(probe))
    truth = np.array([1e-5 * space.cost(c).macs for c in probe])
    # Latency additive over layers (as here) is learnt exactly, the largest candidate included.
    assert np.all(np.abs(model.predict(probe) / truth - 1) < 0.02)
    largest = space.largest()
    assert model.predict([largest])[0] == pytest.approx(1e-5 * space.cost(largest).macs, rel=0.02)


class BurstyDevice(FakeDevice):
    """A neighbour's burst slows the first ``burst`` measurements 1.5x (module doc)."""

    burst = 10

    def measure(self, onnx_model, input_shape, *, profile=False):
        m = super().measure(onnx_model, input_shape)
        slow = 1.5 if self.calls <= self.burst else 1.0
        return Measurement(m.median_ms * slow, m.p10_ms, m.p90_ms, m.samples, m.info)


def test_each_measurement_is_the_fastest_pass(space, tmp_path):
    device = BurstyDevice(space)
    cache = tmp_path / "cache.jsonl"
    SpaceLatency.fit(space, device, to_onnx, 12, cache=cache, progress=False)
    assert PASSES > 1 and device.calls > device.burst
    for line in cache.read_text().splitlines():
        record = json.loads(line)
        truth = 1e-5 * space.cost(Candidate.from_dict(record["candidate"])).macs
        assert record["median_ms"] == pytest.approx(truth)


def test_correct_never_under_predicts_a_measured_candidate(space, tmp_path):
    model = SpaceLatency.fit(
        space, FakeDevice(space), to_onnx, 12, cache=tmp_path / "c.jsonl", progress=False
    )
    candidate = space.sample(np.random.default_rng(3))
    slow = 3.0 * float(model.predict([candidate])[0])
    model.correct(candidate, slow)
    assert model.predict([candidate])[0] >= slow * (1 - 1e-9)
    assert model.scale_ > 1.0
    assert model.summary()["samples"] == len(model.records_)


def test_cache_key_follows_what_shapes_the_networks(tmp_path):
    device = FakeDevice(None)
    base = default_cache(tiny_space("mbv3", tmp_path), device)
    assert base == default_cache(tiny_space("mbv3", tmp_path), device)
    assert base != default_cache(tiny_space("mbv3", tmp_path, max_resolution=16), device)
    assert base != default_cache(tiny_space("mbv3", tmp_path, in_channels=1), device)
    assert base != default_cache(tiny_space("mbv3", tmp_path, num_classes=4), device)
    assert INFO.profile in str(base)
    # Reference-timed latencies (at a calibrated speed) never mix with plain ones.
    device.info = dataclasses.replace(INFO, extra={"clock": "thread", "timing": "reference"})
    assert device.info.profile == INFO.profile
    assert base != default_cache(tiny_space("mbv3", tmp_path), device)


class SkewedDevice(FakeDevice):
    """Not additive: candidates with an odd count of int8 layers run 40% faster than the sum of
    their layers says."""

    def measure(self, onnx_model, input_shape, *, profile=False):
        m = super().measure(onnx_model, input_shape)
        candidate = Candidate.from_dict(json.loads(onnx_model))
        fast = 0.6 if sum(b == 8 for b in candidate.bits.values()) % 2 else 1.0
        return Measurement(m.median_ms * fast, m.p10_ms, m.p90_ms, m.samples, m.info)


def test_slack_is_the_measured_over_prediction(space, tmp_path):
    exact = SpaceLatency.fit(
        space, FakeDevice(space), to_onnx, 30, cache=tmp_path / "a.jsonl", progress=False
    )
    assert exact.slack_ == pytest.approx(0.0, abs=0.02)  # an additive device is learnt exactly
    skewed = SpaceLatency.fit(
        space, SkewedDevice(space), to_onnx, 30, cache=tmp_path / "b.jsonl", progress=False
    )
    assert 0.1 < skewed.slack_ <= MAX_SLACK
    assert skewed.summary()["slack"] == skewed.slack_


def test_measure_is_the_fastest_of_the_passes(space, tmp_path):
    device = FakeDevice(space)
    model = SpaceLatency.fit(space, device, to_onnx, 4, cache=tmp_path / "c.jsonl", progress=False)
    device.__class__ = BurstyDevice  # from now on, a burst slows the first measurement
    device.calls, device.burst = 0, 1
    candidate = space.largest()
    assert model.measure(candidate) == pytest.approx(1e-5 * space.cost(candidate).macs)
    assert device.calls == PASSES


def test_a_measured_candidate_is_predicted_as_measured(space, tmp_path):
    model = SpaceLatency.fit(
        space, FakeDevice(space), to_onnx, 12, cache=tmp_path / "d.jsonl", progress=False
    )
    rng = np.random.default_rng(5)
    measured, other = space.sample(rng), space.sample(rng)
    before = model.predict([other])[0]
    model.add(measured, 123.0)
    assert model.predict([measured, other])[0] == 123.0
    assert model.scale_ == 1.0  # adding a measurement is not a correction
    assert model.predict([other])[0] == pytest.approx(before, rel=0.5)
