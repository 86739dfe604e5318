"""Search spaces: YAML loading and validation, candidates, encoding, Optuna, exact cost."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import warnings

import numpy as np
import onnx
import optuna
import pytest
import torch
from tiny_spaces import TINY, tiny_space
from torch.utils.flop_counter import FlopCounterMode

from autocomp.errors import AutocompError
from autocomp.spaces import Candidate, builtin_spaces, get_space

KINDS = list(TINY)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=KINDS)
def space(request, tmp_path_factory):
    return tiny_space(request.param, tmp_path_factory.mktemp("spaces"), num_classes=5)


def candidates(space, n=50, seed=0):
    rng = np.random.default_rng(seed)
    return [space.smallest(), space.largest(), *(space.sample(rng) for _ in range(n - 2))]


# -- loading ---------------------------------------------------------------------------------


def test_builtin_spaces_load_with_their_families():
    assert builtin_spaces() == ["mbv3", "resnet"]
    assert get_space("mbv3").family == "mbv3"
    assert get_space("resnet").family == "resnet"


def test_unknown_space_name_lists_builtins():
    with pytest.raises(
        AutocompError, match=r"unknown search space 'nope' \(built-in: mbv3, resnet"
    ):
        get_space("nope")
    with pytest.raises(AutocompError, match=r"search space file not found: /no/such\.yaml"):
        get_space("/no/such.yaml")


def test_user_copy_of_a_builtin_space_loads(tmp_path):
    from importlib.resources import files

    path = tmp_path / "mine.yaml"
    path.write_text(files("autocomp.builtin_spaces").joinpath("mbv3.yaml").read_text())
    space = get_space(str(path))
    assert space.name == "mine"
    assert space.largest().space == "mine"
    assert len(space.params) == len(get_space("mbv3").params)


MALFORMED = [
    # (edit applied to the tiny mbv3 YAML, key named, problem named)
    (("head: {", "colour: red\nhead: {"), "colour", "unknown key"),
    (("expand: [2, 3]", "expand: [2, 3]\n    dilation: [1]"), "stages[1].dilation", "unknown key"),
    (("kernel: [3, 5, 7]", "kernel: []"), "stages[1].kernel", "empty choice list"),
    (("depth: [1, 2, 3]", "depth: [0, 1]"), "stages[1].depth[0]", "below the minimum 1"),
    (("[16, 24, 32]\nkeep", "[4, 24, 32]\nkeep"), "stages", "impossible strides: total stride 8"),
    (
        ("stride: 2\n    se: true", "stride: 3\n    se: true"),
        "stages[1].stride",
        "3 is not one of [1, 2]",
    ),
    (("width: [8, 16]", "width: [8, sixteen]"), "stages[1].width[1]", "expected int"),
    (("kernel: [3, 5, 7]", "kernel: [3, 4]"), "stages[1].kernel", "must be odd"),
    (("bits: [8, 32]", "bits: [8, 12]"), "bits[1]", "12 is not one of [4, 8, 16, 32]"),
    (("keep_ratio: [0.5, 0.75, 1.0]", "keep_ratio: [0.5, 1.5]"), "keep_ratio[1]", "above the max"),
    (("se: true", "se: yes please"), "stages[1].se", "expected true or false"),
    (("head: {width: 32, hidden: 48, act: hswish}", ""), "head", "missing"),
    (("family: mbv3", "family: vgg"), "family", "'vgg' is not one of ['mbv3', 'resnet']"),
]


@pytest.mark.parametrize(("edit", "key", "problem"), MALFORMED)
def test_malformed_yaml_names_file_key_and_problem(tmp_path, edit, key, problem):
    path = tmp_path / "broken.yaml"
    old, new = edit
    assert old in TINY["mbv3"]
    path.write_text(TINY["mbv3"].replace(old, new, 1))
    with pytest.raises(AutocompError) as err:
        get_space(str(path))
    message = str(err.value)
    assert message.startswith(f"search space {path}: key '{key}': ")
    assert problem in message
    assert "\n" not in message


def test_invalid_yaml_syntax_and_non_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("family: mbv3\nstages: [\n")
    with pytest.raises(AutocompError, match=rf"search space {path}: invalid YAML at line \d"):
        get_space(str(path))
    path.write_text("- 1\n- 2\n")
    with pytest.raises(AutocompError, match="expected a mapping at the top level"):
        get_space(str(path))


# -- candidates ------------------------------------------------------------------------------


def test_candidate_json_round_trip_and_stable_key(space):
    for c in candidates(space, 10):
        again = Candidate.from_json(c.to_json())
        assert again == c and hash(again) == hash(c) and again.key() == c.key()
        assert json.loads(c.to_json())["space"] == space.name
    c = space.largest()
    assert c.key() == hashlib.sha1(c.to_json().encode()).hexdigest()
    shuffled = Candidate(c.space, c.resolution, dict(reversed(c.arch.items())), c.widths, c.bits)
    assert shuffled == c and shuffled.key() == c.key()
    assert space.smallest() != c


def test_candidate_key_is_fixed_across_versions():
    c = Candidate("s", 32, {"depth.0": 2}, {"stem": 0.5}, {"stem": 8})
    assert c.to_json() == (
        '{"arch":{"depth.0":2},"bits":{"stem":8},"resolution":32,"space":"s","widths":{"stem":0.5}}'
    )
    assert c.key() == hashlib.sha1(c.to_json().encode()).hexdigest()


def test_bad_candidates_are_refused(space):
    with pytest.raises(AutocompError, match="not a valid candidate: invalid JSON"):
        Candidate.from_json("{")
    with pytest.raises(AutocompError, match="not a valid candidate: KeyError"):
        Candidate.from_json('{"space": "x"}')
    c = space.largest()
    with pytest.raises(AutocompError, match=r"belongs to space 'other'"):
        space.check(dataclasses.replace(c, space="other"))
    with pytest.raises(AutocompError, match=r"resolution=17 is not one of \[16, 24, 32\]"):
        space.cost(dataclasses.replace(c, resolution=17))
    bits = dict(c.bits)
    bits.pop("stem")
    with pytest.raises(AutocompError, match=r"missing 'bits\.stem'"):
        space.check(dataclasses.replace(c, bits=bits))
    with pytest.raises(AutocompError, match=r"unknown choice 'arch\.colour'"):
        space.check(dataclasses.replace(c, arch={**c.arch, "colour": 1}))


def test_inactive_blocks_are_dropped_so_equal_networks_are_equal(space):
    rng = np.random.default_rng(1)
    for c in candidates(space, 20):
        depth = {int(k.split(".")[1]): v for k, v in c.arch.items() if k.startswith("depth.")}
        for key in [*c.widths, *c.bits]:
            if key.startswith("stages."):
                s, b = map(int, key.split(".")[1:3])
                assert b < depth[s]
    c = space.smallest()
    assert space.mutate(c, rng, 0.0) == c


def test_sample_is_seeded_and_vary_fixes_other_kinds(space):
    a = [space.sample(np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]
    largest = space.values(space.largest())
    for _ in range(10):
        c = space.sample(np.random.default_rng(_), vary={"resolution"})
        values = space.values(c)
        assert {k for k in values if values[k] != largest[k]} <= {"resolution"}
    with pytest.raises(AutocompError, match="has no choice kind 'colour'"):
        space.sample(np.random.default_rng(0), vary={"colour"})


def test_largest_and_smallest_bound_the_cost(space):
    lo, hi = space.cost(space.smallest()), space.cost(space.largest())
    for c in candidates(space, 30)[2:]:
        cost = space.cost(c)
        assert lo.macs <= cost.macs <= hi.macs
        assert lo.params <= cost.params <= hi.params


def test_mutate_and_crossover_stay_inside_the_space(space):
    rng = np.random.default_rng(3)
    pool = candidates(space, 20)
    children = [space.mutate(c, rng, 0.3) for c in pool]
    children += [space.crossover(a, b, rng) for a, b in zip(pool, reversed(pool), strict=True)]
    for child in children:
        assert space.check(child) is child
    assert sum(child != parent for child, parent in zip(children, pool, strict=False)) >= 15
    a, b = space.smallest(), space.largest()
    for _ in range(10):
        child = space.values(space.crossover(a, b, rng))
        va, vb = space.values(a), space.values(b)
        assert all(v in (va.get(k), vb.get(k)) or k not in va for k, v in child.items())


def test_suggest_with_optuna(space):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        c = space.suggest(trial)
        space.check(c)
        assert set(trial.params) == set(space.values(c))
        study.tell(trial, float(space.cost(c).macs))
    fixed = space.largest()
    again = space.suggest(optuna.trial.FixedTrial(space.values(fixed)))
    assert again == fixed


def test_encode_is_fixed_length_deterministic_and_zero_when_inactive(space):
    pool = candidates(space, 12)
    x = space.encode(pool)
    names = space.encoding_names()
    assert x.shape == (12, len(names)) and x.dtype == np.float32
    np.testing.assert_array_equal(x, space.encode(pool))
    col = {n: i for i, n in enumerate(names)}
    smallest = x[0]
    assert smallest[col["resolution"]] == min(space.resolution)
    assert smallest[col["arch.depth.1"]] == 1
    assert smallest[col["arch.depth.1"] + 2 :].any()
    inactive = [n for n in names if n.endswith(".1.1") or ".stages.1.1." in n]
    assert inactive and all(smallest[col[n]] == 0 for n in inactive)
    largest = x[1]
    assert all(largest[col[n]] > 0 for n in names)


# -- exact cost ------------------------------------------------------------------------------


def _counted(model, shape):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape))
    return counter.get_total_flops()


@pytest.mark.slow
def test_cost_equals_flop_counter_and_parameter_count(space):
    for c in candidates(space, 50):
        model = space.build(c).eval()
        cost = space.cost(c)
        shape = (1, space.in_channels, c.resolution, c.resolution)
        assert 2 * cost.macs == cost.flops == _counted(model, shape)
        assert cost.params == sum(p.numel() for p in model.parameters())


def test_cost_follows_input_shape_and_classes(space):
    c = space.sample(np.random.default_rng(5))
    model = space.build(c, num_classes=7, in_channels=1).eval()
    shape = (3, 1, 20, 28)
    cost = space.cost(c, input_shape=shape, num_classes=7)
    assert cost.flops == _counted(model, shape)
    assert cost.params == sum(p.numel() for p in model.parameters())


def _onnx_bytes(model, shape):
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (torch.randn(shape),), buf, dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
        )  # fmt: skip
    return buf.getvalue()


def _trained_like(model):
    """Distinct, non-trivial weights and BN statistics (fresh BNs fold to equal, shared biases)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return model


def test_fp32_size_matches_the_exported_file(space):
    rng = np.random.default_rng(11)
    for c in [space.smallest(), space.largest(), space.sample(rng), space.sample(rng)]:
        c = dataclasses.replace(c, bits=dict.fromkeys(c.bits, 32))
        shape = (1, space.in_channels, c.resolution, c.resolution)
        size = len(_onnx_bytes(_trained_like(space.build(c)), shape))
        assert abs(space.cost(c).size_bytes / size - 1) < 0.02, (space.cost(c), size)


def test_int8_layers_shrink_the_modeled_size():
    space = get_space("mbv3")
    c = space.largest()
    int8 = dataclasses.replace(c, bits=dict.fromkeys(c.bits, 8))
    fp32, q = space.cost(c).size_bytes, space.cost(int8).size_bytes
    assert 0.25 * fp32 < q < 0.3 * fp32
    assert space.cost(int8).macs == space.cost(c).macs
    one = dataclasses.replace(c, bits={**c.bits, "head.fc": 8})
    saved = space.cost(c).size_bytes - space.cost(one).size_bytes
    n_in, n_out = 960, 1280  # head.fc of the largest candidate
    assert saved == 3 * n_in * n_out + 4 * n_out - n_out * (4 + 1 + 12) - 2200


def test_exported_model_matches_torch(space):
    import onnxruntime as ort

    c = space.sample(np.random.default_rng(2))
    model = space.build(c).eval()
    x = torch.randn(2, space.in_channels, c.resolution, c.resolution)
    data = _onnx_bytes(model, tuple(x.shape))
    onnx.checker.check_model(onnx.load_model_from_string(data))
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mbv3", "resnet"])
def test_builtin_cost_is_exact(name):
    space = get_space(name)
    for c in candidates(space, 12, seed=4):
        model = space.build(c).eval()
        shape = (1, 3, c.resolution, c.resolution)
        cost = space.cost(c)
        assert cost.flops == _counted(model, shape)
        assert cost.params == sum(p.numel() for p in model.parameters())
