"""Orchestration: the only module that wires stages together. The CLI is a thin layer over it.

Stages are imported inside the functions that use them, so that a command only pays for the stages
it runs (``autocomp --help`` and budget errors answer at once, without loading torch).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from autocomp.budget import Budget
from autocomp.errors import AutocompError
from autocomp.prune import KEEP_RATIOS, TUNE_BATCHES

if TYPE_CHECKING:
    from autocomp.hardware import Measurement

T = TypeVar("T")


def measure(
    model: str | Path,
    *,
    device: str = "cpu",
    input_shape: tuple[int, ...] | None = None,
    threads: int = 1,
    profile: bool = False,
    reference: bool = False,
) -> Measurement:
    """Measure an ONNX file's latency on ``device`` (input shape read from the model if static);
    with ``reference``, at the host's calibrated speed (:mod:`autocomp.hardware.reference`)."""
    from autocomp import hardware

    path = Path(model)
    if not path.is_file():
        raise AutocompError(f"model file not found: {path}")
    onnx_model = hardware.load_onnx(path)
    shape = input_shape or hardware.static_input_shape(onnx_model, path)
    timing = hardware.Timing(reference=reference)
    return hardware.get_device(device, threads=threads, timing=timing).measure(
        onnx_model, shape, profile=profile
    )


def measure_dataset(
    out: str | Path | None,
    *,
    device: str = "cpu",
    threads: int = 1,
    generate: int | None = None,
    models: list[str | Path] | None = None,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    batch: int = 1,
    reference: bool = False,
) -> tuple[int, int]:
    """Append measurements (generated CNNs or user models) to a latency dataset file; with
    ``reference``, latencies at the host's calibrated speed (as :func:`measure`).

    Returns (added, total records). Re-running skips what the file already holds.
    """
    from autocomp import hardware
    from autocomp.latency import dataset

    if out is None:
        raise AutocompError("--generate needs --out FILE (the JSONL dataset to append to)")
    timing = replace(dataset.TIMING, reference=reference)
    dev = hardware.get_device(device, threads=threads, timing=timing)
    if generate:
        added = dataset.measure_generated(dev, generate, out, seed=seed, batch=batch)
    else:
        added = dataset.measure_files(dev, models or [], out, input_shape=input_shape)
    return added, len(dataset.read_records(out))


def fit_predictor(
    data: str | Path, *, kind: str = "kernel", out: str | Path, cross_validate: bool = False
) -> dict[str, Any]:
    """Fit a latency predictor (kernel, arch or lut) on a dataset file and save it; with
    ``cross_validate``, the summary also scores it on its own data by 5-fold cross-validation."""
    from autocomp.latency import fit

    return fit.fit_dataset(data, kind, out, cross_validate=cross_validate)


def evaluate_predictor(predictor: str | Path, data: str | Path) -> dict[str, Any]:
    """Accuracy metrics of a predictor on a dataset of its own device profile."""
    from autocomp.latency import fit

    return fit.evaluate_dataset(predictor, data)


def predict_latency(
    predictor: str | Path, model: str | Path, *, input_shape: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """Predicted latency of an ONNX file by a kernel predictor."""
    from autocomp.latency import fit

    return fit.predict_file(predictor, model, input_shape)


def devices() -> list[dict[str, Any]]:
    """Every device kind this machine could measure on, with its profile or why not."""
    from autocomp import hardware

    return hardware.available_devices()


def describe_data(
    spec: str, *, resolution: int | None = None, channels: int | None = None
) -> dict[str, Any]:
    """Load a dataset spec exactly as a search would and summarise it."""
    from autocomp import data

    return data.load(spec, resolution=resolution, channels=channels).summary()


def report(run_dir: str | Path) -> dict[str, Any]:
    """Re-render a run folder's plot and page from its report.json, and return the report."""
    from autocomp import report as reporting

    return reporting.render(run_dir)


def report_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary of a report as (label, value) rows."""
    from autocomp import report as reporting

    return reporting.summary_rows(report)


def serve_device(
    *, host: str, port: int, token: str | None, max_bytes: int, threads: int = 1
) -> None:
    """Run a measurement agent until interrupted."""
    from autocomp import hardware

    hardware.serve(host=host, port=port, token=token, max_bytes=max_bytes, threads=threads)


@dataclass
class Result:
    """What a search hands back. ``metrics`` is the report's ``chosen`` entry (accuracy torch/ONNX,
    latency predicted/measured, MACs, params, size); the run folder holds everything else."""

    model: Any  # the finetuned torch module, int8 layers fake-quantized
    onnx_path: Path
    metrics: dict[str, Any]
    pareto: list[dict[str, Any]]
    run_dir: Path
    meets_budget: bool


@dataclass(frozen=True)
class Effort:
    """How much work each stage does; ``quick`` is a fast demo, the default fits the README's
    15-minute main job on 2 cores."""

    supernet_epochs: int
    qat_epochs: int
    latency_samples: int
    trials: int
    finetune_epochs: int

    @classmethod
    def of(cls, quick: bool) -> Effort:
        if quick:
            return cls(
                supernet_epochs=4, qat_epochs=1, latency_samples=12, trials=16, finetune_epochs=4
            )
        from autocomp.supernet.train import TrainConfig

        default = TrainConfig()  # the supernet's numbers have one home: TrainConfig's defaults
        return cls(
            supernet_epochs=default.epochs,
            qat_epochs=default.qat_epochs,
            latency_samples=40,
            trials=40,
            finetune_epochs=12,
        )


REPAIR_ROUNDS = 3


def search(
    data: str = "digits",
    budget: str | Budget = "5ms",
    device: str = "cpu",
    space: str = "mbv3",
    *,
    out: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    sampler: str = "tpe",
    trials: int | None = None,
    quick: bool = False,
    supernet: str | Path | None = None,
    storage: str | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    workers: int = 2,
    measure_every: int = 0,
    threads: int = 1,
    reference: bool = False,
    allow_over_budget: bool = False,
    progress: bool = True,
) -> Result:
    """Search the most accurate model that meets ``budget`` on ``device``; finetune, export and
    verify it on the device; write everything to the run folder (``out``, default
    ``runs/<space>-<budget>``).

    Inputs are all validated before anything is written. If the exported model misses the budget
    as measured, the latency model is corrected with that measurement and another candidate is
    chosen (at most ``REPAIR_ROUNDS`` times); a model that still misses is returned with
    ``meets_budget=False`` (the CLI then exits non-zero unless ``--allow-over-budget``).
    With ``reference``, every latency is timed at the host's calibrated speed
    (:mod:`autocomp.hardware.reference`; for a shared host whose speed drifts).
    """
    import numpy as np
    import torch

    from autocomp import data as data_specs
    from autocomp.search import CostModel, choice, run_search, seeding
    from autocomp.supernet.train import calibration_batches, evaluate_subnet

    with _torch_threads(1):  # training and evaluation; see _supernet
        timings: dict[str, float] = {}
        clock = _Stopwatch(timings)
        # Validate everything before writing anything.
        with clock("validate"):
            budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
            effort = Effort.of(quick)
            dev, screener = _devices(device, threads, reference)
            dataset = data_specs.load(data)
            space_obj = space_for(space, dataset)
            run_dir = _run_dir(out, space_obj.name, budget, resume)
            given = None if supernet is None else _given_supernet(Path(supernet), space_obj, seed)
        torch.manual_seed(seed)
        fit_part = dataset.validation_split(0.2, seed=seed)  # the search never sees the test split
        bn_batches = calibration_batches(fit_part.x_train, seed=seed)
        val_split = (fit_part.x_test, fit_part.y_test)
        # An unachievable budget is bad input: refused before anything is written (exact terms
        # first, as they cost nothing to check).
        rng = np.random.default_rng(seed)
        CostModel(space_obj, replace(budget, latency_ms=None)).check_achievable(rng)
        with clock("latency model"):
            from autocomp.latency.space import SpaceLatency

            latency = SpaceLatency.fit(
                space_obj,
                screener,
                _to_onnx(space_obj, bn_batches),
                effort.latency_samples,
                seed=seed,
                progress=progress,
            )
        CostModel(space_obj, budget, latency.predict).check_achievable(rng)

        screening = _screening_budget(run_dir, budget, latency.slack_)
        run_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "data": data,
            "budget": budget.terms(),
            "screening_budget": screening.terms(),
            "device": dev.info.to_dict(),
            "space": space_obj.name,
            "space_source": space_obj.source,
            "seed": seed,
            "sampler": sampler,
            "quick": quick,
            "effort": asdict(effort),
            "backend": backend,
            "threads": threads,
            "autocomp_version": _version(),
        }
        _write_json(run_dir / "config.json", config)
        with clock("supernet"):
            net = _supernet(space_obj, fit_part, effort, seed, run_dir, given, progress)

        def evaluate_fn(candidate):
            return evaluate_subnet(net, candidate, bn_batches, val_split)

        def measure_fn(candidate):
            return latency.measure(candidate)

        seed_log: list[dict[str, Any]] = []  # the uniform scalings measured to seed the search
        with clock("search"):
            seeds, baselines = seeding.search_seeds(space_obj, budget, screening, latency, seed_log)
            found = run_search(
                space_obj,
                screening,
                evaluate_fn=evaluate_fn,
                run_dir=run_dir,
                latency_fn=latency.predict if budget.latency_ms is not None else None,
                measure_fn=measure_fn if measure_every else None,
                measure_every=measure_every,
                sampler=sampler,
                n_trials=trials or effort.trials,
                seed=seed,
                storage=storage,
                resume=resume,
                backend=backend,
                ray_address=ray_address,
                workers=workers,
                first=seeds,
                progress=progress,
            )
        shortlist: list[dict[str, Any]] = []
        with clock("shortlist"):

            def choose(tried: list[str], among: list[dict[str, Any]] = found.trials):
                return choice.measured_choice(
                    among, latency, budget, tried, shortlist, len(val_split[1])
                )

            contenders = choice.contenders(
                choose, found.trials, baselines, latency, budget, nested=True
            )

        @_once_per_candidate
        def finetune(candidate, record):
            return _finetune(
                space_obj, net, candidate, fit_part, bn_batches, evaluate_fn, effort, seed, progress
            )

        with clock("arbitration"):
            first, arbitration = choice.arbitrate(contenders, finetune, len(val_split[1]))
        first = first or found.best_metrics  # (which verification then judges)

        def verify(model, candidate):
            cost = space_obj.cost(candidate).to_dict()
            return _export_and_verify(
                model, candidate, cost, dataset, bn_batches, dev, budget, run_dir
            )

        model, candidate, rounds = _verify_rounds(
            first, choose, latency, budget, clock, finetune, verify
        )
        final = rounds[-1]
        report = _report(
            config, budget, dev, space_obj, candidate, final, found, latency, rounds, timings
        )
        report["search"]["screening_budget_ms"] = screening.latency_ms
        report["seeding"] = seed_log
        report["shortlist"] = shortlist
        report["arbitration"] = arbitration
        missed = [m for m in shortlist if m["latency_measured_ms"] > (budget.latency_ms or 0)]
        if missed:
            report["notes"].append(
                f"{len(missed)} candidate(s) ranked above the chosen one measured over the "
                "latency budget on the device before finetuning (see 'shortlist')"
            )
        return _write_run(run_dir, model, candidate, report, clock, timings)


SAMPLERS_COMPRESS = ("tpe", "nsga2", "random")


def compress(
    model: Any = "timm:resnet18",
    data: str = "digits",
    budget: str | Budget = "5ms",
    device: str = "cpu",
    *,
    weights: str | Path | None = None,
    example_input: Any = None,
    resolution: int | None = None,
    keep_ratios: Sequence[float] = KEEP_RATIOS,
    bits: Sequence[int] = (8, 32),
    importance: str = "l1",
    latency: str = "measure",
    tune_batches: int = TUNE_BATCHES,
    ignored_layers: Sequence[str] = (),
    out: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    sampler: str = "tpe",
    trials: int | None = None,
    quick: bool = False,
    epochs: int | None = None,
    storage: str | None = None,
    threads: int = 1,
    reference: bool = False,
    allow_over_budget: bool = False,
    progress: bool = True,
) -> Result:
    """Compress an existing model to meet ``budget`` on ``device``: search a per-group channel
    keep ratio (``keep_ratios``) and a per-layer bitwidth (``bits``) jointly, finetune the winner
    with distillation from the original (and QAT where its calibrated int8 layers lose
    accuracy: :func:`~autocomp.prune.finish.finish`), export it (QDQ ONNX), verify it on the
    device and report, in a run folder like ``search``'s (``out``, default
    ``runs/compress-<name>-<budget>``).

    ``model`` is ``"timm:NAME"`` (built for the data's classes and channels, ``pretrained=False``;
    ``weights`` is a state_dict file for it) or any ``nn.Module`` with ``example_input`` (one
    N×C×H×W batch; H = W is the deployed resolution). Channel groups come from Torch-Pruning's
    dependency graph and are ranked by ``importance`` (``l1``, ``taylor``, ``fpgm``); a model it
    cannot trace is searched over bits only (the report says why). Policies are scored after
    BatchNorm recalibration (+ ``tune_batches`` SGD steps); their latency is ``measure``d on the
    device or ``predict``ed by the calibrated kernel predictor. As in ``search``, the best
    policies that meet the budget as verification times them are finetuned beside the widest
    uniform policy per precision that does (:func:`~autocomp.search.seeding.uniform_baselines`),
    the most accurate on validation afterwards is shipped, and a model that misses the budget as
    measured is replaced (at most ``REPAIR_ROUNDS`` rounds). ``reference`` as in ``search``.

    Selection uses ``data``'s validation split ``validation_split(0.2)``, the same whatever
    ``seed``: train ``model`` on that split's ``x_train`` so that it has not seen those images.
    """
    import numpy as np
    import torch

    from autocomp.prune.deploy import export_policy
    from autocomp.prune.finish import agreement, finish, score
    from autocomp.prune.latency import MODES, PolicyLatency
    from autocomp.prune.pruning import IMPORTANCES, ModelPruner
    from autocomp.search import CostModel, choice, run_search, seeding
    from autocomp.supernet.train import calibration_batches, evaluate, view

    with _torch_threads(1):
        timings: dict[str, float] = {}
        clock = _Stopwatch(timings)
        # Validate everything before writing anything.
        with clock("validate"):
            budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
            effort = Effort.of(quick)
            if sampler not in SAMPLERS_COMPRESS:
                raise AutocompError(
                    f"compress samples with {', '.join(SAMPLERS_COMPRESS)}, not {sampler!r} "
                    "(every cost of a policy is counted on its pruned network)"
                )
            if latency not in MODES:
                raise AutocompError(f"unknown latency mode {latency!r}; use {', '.join(MODES)}")
            if int(tune_batches) != tune_batches or tune_batches < 0:
                raise AutocompError(f"tune_batches must be a whole number ≥ 0, not {tune_batches}")
            if epochs is not None and (int(epochs) != epochs or epochs < 1):
                raise AutocompError(f"epochs must be a whole number ≥ 1, not {epochs!r}")
            if not keep_ratios or not all(0 < float(k) <= 1 for k in keep_ratios):
                raise AutocompError(f"keep ratios must lie in (0, 1], got {list(keep_ratios)}")
            if not bits or not set(bits) <= {8, 32}:
                raise AutocompError(f"bits must be 8 and/or 32 (what ONNX Runtime runs): {bits}")
            if importance not in IMPORTANCES:
                raise AutocompError(
                    f"unknown importance {importance!r}; use one of {', '.join(IMPORTANCES)}"
                )
            dev, screener = _devices(device, threads, reference)
            net, name, dataset, r, trained = _compress_inputs(
                model, data, weights, example_input, resolution, seed
            )
            run_dir = _run_dir(out, f"compress-{name}", budget, resume)
            if not resume:
                from autocomp.search.storage import existing_trials

                if existing_trials(storage, run_dir, "search"):
                    raise AutocompError(
                        f"study 'search' in {storage or run_dir / 'study.db'} already holds "
                        "trials; resume it (--resume) or choose another run folder"
                    )
        torch.manual_seed(seed)
        # The validation split does not move with ``seed``: the model was trained before, and on
        # images it has seen, selection rewards what it memorised (keeping it near the original),
        # not what generalises; one fixed split can be held out when training it.
        fit_part = dataset.validation_split(0.2)  # the search never sees the test split
        bn_batches = calibration_batches(fit_part.x_train, seed=seed)
        val_split = (fit_part.x_test, fit_part.y_test)
        channels = dataset.input_shape[0]
        example = torch.zeros(1, channels, r, r)
        with clock("analyse"):
            grads = [
                (view(torch.as_tensor(x), r), torch.as_tensor(y))
                for x, y in zip(
                    np.array_split(fit_part.x_train[:256], 4),
                    np.array_split(fit_part.y_train[:256], 4),
                    strict=True,
                )
            ]
            pruner = ModelPruner(
                net,
                example,
                importance=importance,
                ignored_layers=ignored_layers,
                gradient_batches=grads,
                check_ratios=keep_ratios,
            )
            space_obj, space_notes = _policy_space(
                name, pruner, net, r, channels, keep_ratios, bits, bn_batches[0][:8]
            )
            lat = PolicyLatency(
                space_obj,
                screener,
                bn_batches[0][:8],
                mode=latency,
                predictor=_kernel_predictor(dev, progress) if latency == "predict" else None,
                verifier=dev,
            )
        # An unachievable budget is bad input: refused before anything is written.
        rng = np.random.default_rng(seed)
        CostModel(space_obj, replace(budget, latency_ms=None)).check_achievable(rng)
        with clock("latency"):
            original_ms = lat.measure(space_obj.largest())
            # The fastest policy is the smallest one in int8 or in fp32, whichever measures
            # faster (Q/DQ overhead can outweigh int8 kernels on small layers).
            floor = {b: lat.measure(space_obj.smallest(bits=b)) for b in space_obj.bit_choices}
            space_obj.smallest_bits = min(floor, key=floor.get)
            # A bits-only space (no channel group) keeps its int8 choices even then: without
            # them nothing would be left to search, and single layers may still gain.
            if (
                len(floor) > 1
                and floor[8] > floor[32]
                and budget.size_bytes is None
                and space_obj.groups
            ):
                whole8 = lat.measure(space_obj.largest(bits=8))
                if whole8 > original_ms:  # int8 made both ends slower: offer fp32 only
                    space_notes.append(
                        f"no int8 choices: on this device the model in int8 measured {whole8:.3g} "
                        f"ms against {original_ms:.3g} ms in fp32, and its smallest policy "
                        f"{floor[8]:.3g} against {floor[32]:.3g} ms (quantize/dequantize cost "
                        "more than the int8 kernels save)"
                    )
                    space_obj = _policy_space(
                        name, pruner, net, r, channels, keep_ratios, (32,), bn_batches[0][:8]
                    )[0]
                    space_obj.smallest_bits = 32
                    lat.space = space_obj
            if latency == "predict":
                calibrate = [space_obj.largest(), space_obj.smallest()]
                calibrate += [space_obj.sample(rng) for _ in range(3)]
                lat.calibrate(calibrate)
            CostModel(space_obj, budget, measure_fn=lat.measure).check_achievable(rng)

        run_dir.mkdir(parents=True, exist_ok=True)
        lat.attach(run_dir / "latency.jsonl")
        config = {
            "command": "compress",
            "model": name,
            "weights": str(weights) if weights is not None else None,
            "data": data,
            "budget": budget.terms(),
            "device": dev.info.to_dict(),
            "space": space_obj.name,
            "resolution": r,
            "keep_ratios": list(space_obj.keep_ratios),
            "bits": list(space_obj.bit_choices),
            "importance": importance,
            "latency": latency,
            "tune_batches": tune_batches,
            "seed": seed,
            "sampler": sampler,
            "quick": quick,
            "effort": asdict(effort),
            "epochs": epochs,
            "threads": threads,
            "autocomp_version": _version(),
        }
        _write_json(run_dir / "config.json", config)
        teacher = net if trained else None
        test = (dataset.x_test, dataset.y_test)
        original = {
            "val_accuracy": evaluate(net, val_split, r),
            "test_accuracy": evaluate(net, test, r),
            "latency_ms": original_ms,
            **space_obj.cost(space_obj.largest()).to_dict(),
        }
        tune = ((fit_part.x_train, fit_part.y_train), tune_batches) if tune_batches else None

        def evaluate_fn(candidate):
            return score(
                space_obj, candidate, bn_batches, val_split, teacher=teacher, tune=tune, seed=seed
            )

        with clock("search"):
            if not resume:
                seeding.seed_study(space_obj, sampler, storage, run_dir)
            found = run_search(
                space_obj,
                budget,
                evaluate_fn=evaluate_fn,
                run_dir=run_dir,
                latency_fn=lat.predict if latency == "predict" else None,
                measure_fn=lat.measure,
                sampler=sampler,
                n_trials=trials or effort.trials,
                seed=seed,
                storage=storage,
                resume=True,  # the study was created (and seeded) above, or is resumed
                progress=progress,
            )
        finetune_epochs = epochs or effort.finetune_epochs

        @_once_per_candidate
        def finetune(candidate, record):
            model, tuned = finish(
                space_obj,
                candidate,
                teacher,
                fit_part,
                bn_batches,
                epochs=finetune_epochs,
                # Added only where calibrated int8 layers lose accuracy (finish's doc): a pruned
                # network regains it in fp32 epochs, QAT only adapts it to the int8 grid.
                qat_epochs=max(1, finetune_epochs // 4),
                seed=seed,
                progress=progress,
            )
            tuned["inherited_val_accuracy"] = record["accuracy"]
            return model, tuned

        def verify(model, candidate):
            cost = space_obj.cost(candidate).to_dict()
            onnx_path = run_dir / "model.onnx"
            verdict = _export_and_verify(
                model,
                candidate,
                cost,
                dataset,
                bn_batches,
                dev,
                budget,
                run_dir,
                export=export_policy,
            )
            verdict["agreement"] = agreement(model, onnx_path, test, r)
            return verdict

        shortlist: list[dict[str, Any]] = []  # the picks measured as verification measures

        def choose(tried: list[str], among: list[dict[str, Any]] = found.trials):
            n_val = len(val_split[1])
            return choice.measured_choice(
                among, lat, budget, tried, shortlist, n_val, measure=lat.verify
            )

        # As in search: scores after a few tuned steps rank policies before the finetune, which
        # does not lift them alike, so the picks are finetuned beside the uniform policies that
        # just fit, scored as the search scores its trials.
        with clock("baselines"):
            baselines = seeding.uniform_baselines(space_obj, budget, lat.measure, lat.verify)
            known = {_candidate(t).key() for t in choice.evaluated(found.trials)}
            rows = found.trials + [
                {
                    "number": None,  # not a trial of the study: off its keep-ratio grid
                    "accuracy": evaluate_fn(c),
                    "candidate": c.to_dict(),
                    **space_obj.cost(c).to_dict(),
                }
                for c in baselines
                if c.key() not in known
            ]
        with clock("arbitration"):
            contenders = choice.contenders(choose, rows, baselines, lat, budget)
            first, arbitration = choice.arbitrate(contenders, finetune, len(val_split[1]))
        tuned_model, candidate, rounds = _verify_rounds(
            first or found.best_metrics, choose, lat, budget, clock, finetune, verify
        )
        final = rounds[-1]
        report = _report(
            config, budget, dev, space_obj, candidate, final, found, lat, rounds, timings
        )
        report["chosen"]["accuracy"]["agreement"] = final["agreement"]
        report["chosen"]["channels"] = space_obj.channels(tuned_model)
        report["compress"] = {
            "model": name,
            "trained": trained,
            "importance": importance,
            "latency": lat.summary(),
            "groups": len(space_obj.groups),
            "skipped_groups": pruner.skipped,
            "unsupported": pruner.unsupported,
            "quantizable_layers": len(space_obj.layers),
            "original": original,
        }
        report["shortlist"] = shortlist
        report["arbitration"] = arbitration
        report["notes"] += space_notes
        for i, rnd in enumerate(rounds, 1):
            if len(rnd.get("measurements_ms", [])) > 1:
                medians = ", ".join(f"{ms:.3g}" for ms in rnd["measurements_ms"])
                report["notes"].append(
                    f"round {i}: the model missed the latency budget when first measured and was "
                    f"measured again (medians {medians} ms); the fastest counts"
                )
        if not trained:
            report["notes"].append(
                "the model has random weights (no --weights): importance ranks and the search's "
                "scores are those of an untrained network, and no distillation teacher was used"
            )
        return _write_run(run_dir, tuned_model, candidate, report, clock, timings)


#: Measurements of a verified model that missed its latency budget, counting the first.
VERIFY_MEASUREMENTS = 3


def _remeasure(verdict: dict[str, Any], dev, path: Path, shape, budget: Budget) -> None:
    """A model that missed only its latency budget is measured again (up to
    ``VERIFY_MEASUREMENTS`` in all) and its fastest median counts: load from other processes
    inflates a whole measurement now and then (p90 at 3× p10 was seen here), never deflates it.
    Every median is kept in ``verdict["measurements_ms"]``."""
    if budget.latency_ms is None or set(verdict["violations"]) != {"latency_ms"}:
        return
    medians = [verdict["measured"]["median_ms"]]
    best = verdict["measured"]
    while len(medians) < VERIFY_MEASUREMENTS and best["median_ms"] > budget.latency_ms:
        again = dev.measure(path, shape)
        medians.append(again.median_ms)
        if again.median_ms < best["median_ms"]:
            best = again.to_dict() | {"samples": len(again.samples)}
    verdict["measured"] = best
    verdict["measurements_ms"] = medians
    over = best["median_ms"] > budget.latency_ms  # the other terms were met already
    verdict["violations"] = {"latency_ms": (best["median_ms"], budget.latency_ms)} if over else {}
    verdict["meets_budget"] = not over


def _compress_inputs(model, data: str, weights, example_input, resolution, seed: int):
    """(network, name, dataset, resolution, trained) of a ``compress`` call, all checked."""
    import torch
    from torch import nn

    from autocomp import data as data_specs
    from autocomp.prune.models import MODEL_FORMS, fit_state, load_state_dict, timm_model
    from autocomp.prune.pruning import output_layers

    if resolution is not None and (int(resolution) != resolution or resolution < 8):
        raise AutocompError(f"resolution must be a whole number ≥ 8, got {resolution!r}")
    if isinstance(model, str):
        if example_input is not None:
            raise AutocompError("example_input is for nn.Module models; timm models take data's")
        dataset = data_specs.load(data)
        r = int(resolution or max(32, dataset.input_shape[-1]))
        torch.manual_seed(seed)  # a random init (no weights) is reproducible
        net = timm_model(
            model,
            num_classes=dataset.num_classes,
            in_channels=dataset.input_shape[0],
            weights=weights,
        )
        name, trained = model.partition(":")[2], weights is not None
    elif isinstance(model, nn.Module):
        shape = tuple(getattr(example_input, "shape", ()))
        if len(shape) != 4 or shape[-1] != shape[-2]:
            raise AutocompError(
                "an nn.Module needs example_input: one N×C×H×W batch with H = W (got "
                f"{shape or type(example_input).__name__})"
            )
        if resolution is not None and resolution != shape[-1]:
            raise AutocompError(f"resolution {resolution} differs from example_input's {shape}")
        dataset = data_specs.load(data, channels=shape[1])
        r, net, name, trained = shape[-1], model, type(model).__name__.lower(), True
        if weights is not None:
            fit_state(net, load_state_dict(weights), str(weights))
    else:
        raise AutocompError(f"unknown model {model!r}; use {MODEL_FORMS}")
    _, out_shape = output_layers(net, torch.zeros(1, dataset.input_shape[0], r, r))
    if out_shape[-1] != dataset.num_classes or len(out_shape) != 2:
        raise AutocompError(
            f"the model outputs {out_shape[1:]} per image, the data has {dataset.num_classes} "
            "classes"
        )
    return net.eval(), name, dataset, r, trained


def _policy_space(name, pruner, net, resolution, channels, keep_ratios, bits, probe):
    """The policy space of ``net`` and the notes the report needs about what it left out."""
    import tempfile

    import torch

    from autocomp.prune.quantize import called_layers
    from autocomp.prune.space import PolicySpace
    from autocomp.quant.export import export_onnx

    notes = []
    shape = (1, channels, resolution, resolution)
    # The classifier stays fp32: quantized logits (uint8 steps) make near-ties of the top
    # classes flip between torch and ONNX Runtime, for a negligible share of the latency.
    example = torch.zeros(shape)
    layers = [n for n in called_layers(net, example) if n not in pruner.output_layers]
    with tempfile.TemporaryDirectory(prefix="autocomp-compress-") as tmp:
        fp32 = export_onnx(net, {}, shape, Path(tmp) / "fp32.onnx", calibration_batches=[probe])
        if 8 in bits and layers:
            try:
                export_onnx(
                    net,
                    dict.fromkeys(layers, 8),
                    shape,
                    Path(tmp) / "int8.onnx",
                    calibration_batches=[probe],
                )
            except AutocompError as err:
                notes.append(f"no int8 choices: the int8 export of the model fails ({err})")
                layers = []
    if pruner.unsupported:
        notes.append(f"bits-only search: the model cannot be channel-pruned: {pruner.unsupported}")
    elif pruner.skipped:
        first = next(iter(pruner.skipped.items()))
        notes.append(
            f"{len(pruner.skipped)} channel group(s) kept whole, e.g. {first[0]!r}: {first[1]} "
            "(see compress.skipped_groups)"
        )
    space = PolicySpace(
        name,
        pruner,
        resolution=resolution,
        in_channels=channels,
        layers=layers if 8 in bits else [],
        keep_ratios=keep_ratios,
        bits=bits,
        fp32_size_bytes=fp32.size_bytes,
        prune=pruner.unsupported is None,
    )
    return space, notes


def _devices(device: str, threads: int, reference: bool) -> tuple[Any, Any]:
    """The device as verification times it, and as screening many candidates does (shorter)."""
    from autocomp import hardware

    return (
        hardware.get_device(device, threads=threads, timing=hardware.Timing(reference=reference)),
        hardware.get_device(
            device, threads=threads, timing=replace(hardware.SCREEN_TIMING, reference=reference)
        ),
    )


def _kernel_predictor(dev, progress: bool):
    from autocomp.latency import load_predictor

    return load_predictor(device=dev, progress=progress)


# ------------------------------------------------------------------------- search pipeline


def space_for(space: str, dataset: Any) -> Any:
    """The space as searched for ``dataset``: its classes and channels, and resolutions up to 4×
    the image side (upsampling further adds latency, not information)."""
    from autocomp.spaces import get_space

    return get_space(
        space,
        num_classes=dataset.num_classes,
        in_channels=dataset.input_shape[0],
        max_resolution=max(32, 4 * dataset.input_shape[-1]),
    )


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads, restoring the caller's setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stopwatch:
    """``with clock("stage"):`` adds the stage's wall time to ``timings``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(time.perf_counter() - start, 2)


def _version() -> str:
    from autocomp import __version__

    return __version__


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _screening_budget(run_dir: Path, budget: Budget, slack: float) -> Budget:
    """The budget the search screens with (:func:`choice.screening`). A resumed run keeps the
    one it started with: the slack is re-measured as the latency cache grows, and its study
    continues only the search it was created for."""
    from autocomp.search import choice

    started = run_dir / "config.json"  # only a resumed run's folder holds one (see _run_dir)
    if not started.exists():
        return choice.screening(budget, slack)
    try:
        terms = json.loads(started.read_text()).get("screening_budget")
        return choice.screening(budget, slack) if terms is None else Budget(**terms)
    except (ValueError, TypeError, AttributeError) as err:
        raise AutocompError(
            f"cannot resume the run in {run_dir}: its {started.name}: {err}"
        ) from None


def _run_dir(out: str | Path | None, space: str, budget: Budget, resume: bool) -> Path:
    """The run folder: ``out``, or ``runs/<space>-<budget>`` (numbered when taken).

    A folder that holds a run is only reused with ``resume``; resuming needs one.
    """
    slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in str(budget).replace(",", "-"))
    if out is None:
        base = Path("runs") / f"{space}-{slug}"
        candidates = [base, *(base.with_name(f"{base.name}-{i}") for i in range(2, 1000))]
        taken = [p for p in candidates if (p / "config.json").exists()]
        if resume:
            if not taken:
                raise AutocompError(f"nothing to resume: no run folder {base}")
            return taken[-1]
        return next(p for p in candidates if not p.exists())
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise AutocompError(f"run folder {path} is a file")
    held = (path / "config.json").exists()
    if resume and not held:
        raise AutocompError(f"nothing to resume in {path} (no config.json)")
    if held and not resume:
        raise AutocompError(f"{path} already holds a run; pass --resume to continue it")
    return path


def supernet_config(effort: Effort, seed: int) -> Any:
    """The ``TrainConfig`` a search trains its supernet with (experiments reproduce it)."""
    from autocomp.supernet.train import TrainConfig

    return TrainConfig(
        epochs=effort.supernet_epochs,
        qat_epochs=effort.qat_epochs,
        seed=seed,
        num_threads=1,  # two OpenMP threads on a busy 2-core machine ran 10× slower here
    )


def _given_supernet(path: Path, space, seed: int) -> dict[str, Any]:
    """The checkpoint ``--supernet`` names, refused unless trained for this space and ``seed``:
    a supernet of another seed was trained on another fit split, which holds images of this
    run's validation split, and scoring on images it was trained on favours memorisation."""
    from autocomp.supernet.train import load_checkpoint

    if not path.is_file():
        raise AutocompError(f"supernet checkpoint not found: {path}")
    state = load_checkpoint(path, space=space)
    trained = state["config"].get("seed")
    if trained != seed:
        raise AutocompError(
            f"supernet checkpoint {path} was trained with seed {trained}, whose training images "
            f"include seed {seed}'s validation split; search with --seed {trained}"
        )
    return state


def _supernet(space, fit_part, effort: Effort, seed: int, run_dir: Path, given, progress: bool):
    """Train the supernet (resuming the run folder's checkpoint), or take ``given``'s weights."""

    from autocomp.supernet.train import train_supernet

    net = space.supernet()
    if given is not None:
        net.load_state_dict(given["model"])
        return net
    config = supernet_config(effort, seed)
    train_supernet(
        net, space, fit_part, config, checkpoint=run_dir / "supernet.pt", progress=progress
    )
    return net


def _to_onnx(space, bn_batches):
    """How a candidate is deployed: built, exported with its per-layer bits (QDQ int8)."""
    import tempfile

    from autocomp.quant.export import export_onnx
    from autocomp.supernet.bn import recalibrate_bn
    from autocomp.supernet.train import view

    probe = bn_batches[0][:4]

    def to_onnx(candidate):
        net = space.build(candidate)
        # BatchNorm statistics from real images, as in any trained network: fresh BatchNorms
        # fold into identical biases, which the ONNX exporter shares (Identity nodes), and ORT
        # then leaves those int8 convolutions unfused; such a graph measured 60% slower here
        # than the same candidate finetuned, which misled the latency model fitted on it.
        recalibrate_bn(net, [view(bn_batches[0], candidate.resolution)])
        shape = (1, space.in_channels, candidate.resolution, candidate.resolution)
        with tempfile.TemporaryDirectory() as tmp:
            # Latency does not depend on the calibrated values: a few images calibrate fast.
            info = export_onnx(
                net, candidate, shape, Path(tmp) / "m.onnx", calibration_batches=[probe]
            )
            return info.path.read_bytes(), shape

    return to_onnx


def _candidate(record: dict[str, Any]):
    from autocomp.spaces import Candidate

    return Candidate.from_dict(record["candidate"])


def _finetune(space, net, candidate, fit_part, bn_batches, evaluate_fn, effort, seed, progress):
    """Extract the candidate with its inherited weights; finetune it with KD from the largest."""
    from autocomp.finetune import FinetuneConfig, finetune
    from autocomp.supernet.bn import recalibrate_bn
    from autocomp.supernet.train import cross_entropy, view

    inherited = evaluate_fn(candidate)  # activates it, recalibrates BN and quantizer ranges
    student = space.build(candidate, supernet=net)
    largest = space.largest()
    net.set_active(largest)
    net.set_quantization(False)
    recalibrate_bn(net, (view(b, largest.resolution) for b in bn_batches))
    config = FinetuneConfig(
        epochs=effort.finetune_epochs, qat_epochs=min(2, effort.finetune_epochs), seed=seed
    )
    val = (fit_part.x_test, fit_part.y_test)
    report = finetune(
        student,
        net,
        (fit_part.x_train, fit_part.y_train),
        val,
        config,
        resolution=candidate.resolution,
        teacher_resolution=largest.resolution,
        progress=progress,
    )
    return student, {
        "inherited_val_accuracy": inherited,
        **report.to_dict(),
        "val_loss": cross_entropy(student, val, candidate.resolution),  # arbitrate's tie rule
    }


def _once_per_candidate(finetune: Callable[[Any, Any], T]) -> Callable[[Any, Any], T]:
    """``finetune(candidate, record)`` run once per candidate: the arbitration finetunes the
    contenders, and verification (with its repair rounds) takes the chosen one's from there."""
    done: dict[str, T] = {}

    def once(candidate: Any, record: Any) -> T:
        key = candidate.key()
        if key not in done:
            done[key] = finetune(candidate, record)
        return done[key]

    return once


def _export_and_verify(
    model, candidate, exact, dataset, bn_batches, dev, budget: Budget, run_dir, export=None
):
    """Export as deployed (``export``: default :func:`~autocomp.quant.export.export_onnx`),
    score torch vs ONNX on the test split, measure on the device (again on a latency miss,
    :func:`_remeasure`)."""
    from autocomp.quant.export import export_onnx, onnx_accuracy
    from autocomp.supernet.train import evaluate

    r = candidate.resolution
    shape = (1, dataset.input_shape[0], r, r)
    info = (export or export_onnx)(
        model, candidate, shape, run_dir / "model.onnx", calibration_batches=bn_batches
    )
    test = (dataset.x_test, dataset.y_test)
    measured = dev.measure(info.path, shape)
    costs = {**exact, "latency_ms": measured.median_ms, "size_bytes": info.size_bytes}
    verdict = {
        "key": candidate.key(),
        "accuracy": {"torch": evaluate(model, test, r), "onnx": onnx_accuracy(info.path, test, r)},
        "measured": measured.to_dict() | {"samples": len(measured.samples)},
        "size_bytes": info.size_bytes,
        "quantized_nodes": len(info.quantized_nodes),
        "violations": budget.violations(**{k: costs[k] for k in budget.terms()}),
        "meets_budget": budget.is_met(**{k: costs[k] for k in budget.terms()}),
    }
    _remeasure(verdict, dev, info.path, shape, budget)
    return verdict


def _verify_rounds(record, choose, latency, budget: Budget, clock, finetune, verify):
    """Finetune, export and measure ``record``'s candidate; when it misses the budget as
    measured, correct the latency model with the measurement and take ``choose(tried keys)``,
    at most ``REPAIR_ROUNDS`` times. Returns the last model, its candidate and the verdict of
    every round (``search`` and ``compress`` differ in ``choose``/``finetune``/``verify``)."""
    rounds: list[dict[str, Any]] = []
    while True:
        candidate = _candidate(record)
        with clock(f"finetune#{len(rounds) + 1}"):
            model, tuned = finetune(candidate, record)
        with clock(f"export+verify#{len(rounds) + 1}"):
            verdict = verify(model, candidate)
        # What the choice was made with (a later correction of the model does not rewrite it).
        predicted = record.get("latency_predicted_ms")
        if predicted is None:
            predicted = latency.predict([candidate])[0]
        verdict["predicted_latency_ms"] = float(predicted)
        verdict["finetune"] = tuned
        rounds.append(verdict)
        if verdict["meets_budget"] or len(rounds) >= REPAIR_ROUNDS:
            return model, candidate, rounds
        latency.correct(candidate, verdict["measured"]["median_ms"])
        record = choose([r["key"] for r in rounds])
        if record is None:
            return model, candidate, rounds


def _write_run(run_dir: Path, model, candidate, report: dict[str, Any], clock, timings) -> Result:
    """Save ``model.pt`` and the report (written again once the report stage's own time is in);
    the run's :class:`Result`."""
    from autocomp.report import write_report

    with clock("report"):
        _save_model(run_dir / "model.pt", model, candidate)
        write_report(run_dir, report)
    report["timings_s"] = timings
    write_report(run_dir, report)
    return Result(
        model,
        run_dir / "model.onnx",
        report["chosen"],
        report["pareto"],
        run_dir,
        bool(report["meets_budget"]),
    )


def _report(config, budget, dev, space, candidate, final, found, latency, rounds, timings):
    cost = space.cost(candidate).to_dict()
    measured = final["measured"]
    notes = list(found.notes)
    if len(rounds) > 1:
        notes.append(
            f"{len(rounds) - 1} candidate(s) missed the budget as measured and were "
            "replaced after correcting the latency model (see 'rounds')"
        )
    if not final["meets_budget"]:
        notes.append("THE RETURNED MODEL MISSES THE BUDGET AS MEASURED")
    if budget.latency_ms and measured["median_ms"] < 0.8 * budget.latency_ms:
        share = f"{100 * measured['median_ms'] / budget.latency_ms:.0f}%"
        slowest = float(latency.predict([space.largest()])[0])
        if slowest < budget.latency_ms:
            notes.append(
                f"the model uses {share} of the latency budget because the budget does not bind: "
                f"even the largest candidate of the space is predicted at {slowest:.3g} ms"
            )
        else:
            notes.append(
                f"the model uses {share} of the latency budget: it was the most accurate on "
                "validation after finetuning among the contenders (see 'arbitration'; accuracy, "
                "not latency, decided)"
            )
    return {
        "config": config,
        "budget": budget.terms(),
        "device": dev.info.to_dict(),
        "meets_budget": bool(final["meets_budget"]),
        "chosen": {
            "candidate": candidate.to_dict(),
            "accuracy": final["accuracy"]
            | {
                "supernet_val": final["finetune"]["inherited_val_accuracy"],
                "finetuned_val": final["finetune"]["val_accuracy"],
            },
            "latency_ms": {"predicted": float(final["predicted_latency_ms"]), "measured": measured},
            **cost,
            "size_bytes": final["size_bytes"],
            "size_bytes_predicted": cost["size_bytes"],
        },
        "pareto": [{k: v for k, v in p.items() if k != "constraints"} for p in found.pareto],
        "search": {
            "study": found.study_name,
            "storage": found.storage_url,
            "evaluated": found.n_evaluated,
            "proposals": len(found.trials),
        },
        "latency_model": latency.summary(),
        "rounds": rounds,
        "notes": notes,
        "timings_s": timings,
    }


def _save_model(path: Path, model, candidate) -> None:
    """state_dict + candidate JSON, loadable with ``torch.load(weights_only=True)``."""
    import torch

    torch.save({"state_dict": model.state_dict(), "candidate": candidate.to_json()}, path)
