"""The ``autocomp`` command line: parses arguments and calls :mod:`autocomp.api`, nothing more.

Bad input of any kind ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from autocomp import api
from autocomp.budget import ACCEPTED_FORMS
from autocomp.errors import AutocompError
from autocomp.prune import KEEP_RATIOS, TUNE_BATCHES

EXIT_BAD_INPUT = 2
EXIT_OVER_BUDGET = 3


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (and exit 2) like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise AutocompError(f"{message} (see '{self.prog} --help')")


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape {text!r} is not like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"input shape {text!r} needs positive dimensions")
    return dims


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port {value} is above 65535")
    return value


DEVICE_HELP = (
    "where latency is measured: 'cpu' (ONNX Runtime CPU), 'torch-cpu', 'cuda' or 'cuda:N', "
    "or 'remote://HOST:PORT' (an 'autocomp device serve' agent; token from "
    "$AUTOCOMP_DEVICE_TOKEN). Example: --device cpu"
)
DATA_HELP = (
    "dataset: 'digits' (embedded default), 'npz:PATH' or PATH.npz (x_train, y_train, x_test, "
    "y_test), 'imagefolder:DIR' (DIR/train/<class>/*, DIR/val/<class>/*), 'cifar10:DIR' "
    "(the python batches). Example: --data npz:data/fashion.npz"
)
THREADS_HELP = (
    "intra-op threads used for timing (default 1: stable, comparable). Example: --threads 2"
)

REFERENCE_HELP = (
    "for a shared host whose speed drifts: time a small reference model in alternation with "
    "each model and report latencies at the speed the host had when the reference was "
    "calibrated (first use; cached in $AUTOCOMP_CACHE/reference). cpu device, 1 thread. "
    "Example: --reference"
)


def _add_target_options(p: argparse.ArgumentParser) -> None:
    """What a run aims at, shared by ``search`` and ``compress``: budget, device, data."""
    p.add_argument(
        "--budget",
        required=True,
        help=f"upper bounds to meet; {ACCEPTED_FORMS}. FLOPs = 2·MACs. Example: --budget 5ms",
    )
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--data", default="digits", help=DATA_HELP)


def _add_outcome_options(p: argparse.ArgumentParser) -> None:
    """How a run executes and reports, shared by ``search`` and ``compress``."""
    p.add_argument("--threads", type=_positive_int, default=1, help=THREADS_HELP)
    p.add_argument("--reference", action="store_true", help=REFERENCE_HELP)
    p.add_argument(
        "--allow-over-budget",
        action="store_true",
        help="exit 0 even if the final model misses the budget as measured (it is still "
        "reported loudly). Example: --allow-over-budget",
    )
    p.add_argument("--json", action="store_true", help="print report.json. Example: --json")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autocomp",
        description=(
            "Hardware-aware architecture search and compression: give data and a budget, get the "
            "most accurate model that meets the budget as measured on the device."
        ),
        epilog=(
            "examples:\n"
            "  autocomp search --budget 5ms --device cpu\n"
            "  autocomp compress --model timm:resnet18 --weights w.pt --budget 5ms\n"
            "  autocomp measure --model model.onnx --device cpu --json\n"
            "  autocomp devices\n"
            "  autocomp data npz:data/fashion.npz --resolution 32\n"
            "  autocomp device serve --port 8765 --token SECRET\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "search",
        help="search the most accurate model under a budget",
        description="Search the most accurate model that meets BUDGET on DEVICE.",
        epilog="example:\n  autocomp search --budget 5ms,2MB --device cpu --data digits",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_target_options(p)
    p.add_argument(
        "--space",
        default="mbv3",
        help="search space: 'mbv3', 'resnet' or a YAML file (copy one from search_spaces/). "
        "Example: --space my_space.yaml",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run folder (default runs/<space>-<budget>, numbered when taken). "
        "Example: --out runs/digits-5ms",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (or the latest default folder): reuses its supernet "
        "checkpoint and its Optuna study. Example: --resume",
    )
    p.add_argument("--seed", type=int, default=0, help="one seed for everything. Example: --seed 1")
    p.add_argument(
        "--sampler",
        choices=("tpe", "nsga2", "random", "evolution"),
        default="tpe",
        help="search algorithm (default tpe). Example: --sampler evolution",
    )
    p.add_argument(
        "--trials",
        type=_positive_int,
        default=None,
        help="candidates evaluated on the supernet (default 40, 16 with --quick). "
        "Example: --trials 100",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fast demo: short supernet training, few trials, short finetune. Example: --quick",
    )
    p.add_argument(
        "--supernet",
        default=None,
        help="use this trained supernet checkpoint instead of training one (trained on the same "
        "data and --seed). Example: --supernet runs/mbv3-5ms/supernet.pt",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage shared by several processes: an RDB URL or a journal file "
        "(default: SQLite in the run folder). Example: --storage postgresql://u:p@host/db",
    )
    p.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="evaluate candidates here or as Ray tasks (on a cluster: ray job submit -- "
        "autocomp search ... --backend ray). Example: --backend ray",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (default: start a local one). Example: --ray-address auto",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=2,
        help="concurrent evaluations with --backend ray. Example: --workers 4",
    )
    p.add_argument(
        "--measure-every",
        type=int,
        default=0,
        help="also measure every k-th candidate on the device (0: predict only). "
        "Example: --measure-every 10",
    )
    _add_outcome_options(p)
    p.set_defaults(func=_search)

    p = sub.add_parser(
        "measure",
        help="measure an ONNX model's latency on a device",
        description=(
            "Measure the latency of an ONNX model on a device: warm-up, then repeated timed runs; "
            "prints the median, p10 and p90 in milliseconds."
        ),
        epilog=(
            "examples:\n"
            "  autocomp measure --model resnet18.onnx\n"
            "  autocomp measure --model m.onnx --input-shape 1,3,224,224 --threads 2 --json\n"
            "  autocomp measure --model m.onnx --device remote://127.0.0.1:8765 --profile\n"
            "  autocomp measure --model m.onnx --reference   # at the host's calibrated speed\n"
            "  autocomp measure --generate 300 --device cpu --out data.jsonl"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="ONNX file to time. Example: --model m.onnx")
    what.add_argument(
        "--generate",
        type=_positive_int,
        metavar="N",
        help="measure N random CNNs (latency dataset; needs --out; re-running appends only the "
        "missing ones). Example: --generate 300 --out data.jsonl",
    )
    p.add_argument(
        "--out",
        default=None,
        help="append the measurement(s) with per-node profiles to this JSONL latency dataset. "
        "Example: --out data.jsonl",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="generator seed for --generate. Example: --seed 1"
    )
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=1,
        help="batch size of generated models. Example: --batch 4",
    )
    p.add_argument("--reference", action="store_true", help=REFERENCE_HELP)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        help="input shape, batch first (default: read from the model when static). "
        "Example: --input-shape 1,3,224,224",
    )
    p.add_argument("--threads", type=_positive_int, default=1, help=THREADS_HELP)
    p.add_argument(
        "--profile",
        action="store_true",
        help="also report per-node times from the runtime's profiler. Example: --profile",
    )
    p.add_argument(
        "--json", action="store_true", help="print the measurement as JSON. Example: --json"
    )
    p.set_defaults(func=_measure)

    p = sub.add_parser(
        "devices",
        help="list the devices available here",
        description="List the measurement devices available on this machine, with their profiles.",
        epilog="example:\n  autocomp devices --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON. Example: --json")
    p.set_defaults(func=_devices)

    p = sub.add_parser(
        "data",
        help="load a dataset spec and summarise it",
        description="Load a dataset spec exactly as search would, and print what it holds.",
        epilog="example:\n  autocomp data digits --resolution 32 --channels 3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", help=DATA_HELP)
    p.add_argument(
        "--resolution",
        type=_positive_int,
        default=None,
        help="resize images to this square side (default: keep). Example: --resolution 32",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="convert to 1 or 3 channels (default: keep). Example: --channels 3",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON. Example: --json")
    p.set_defaults(func=_data)

    p = sub.add_parser(
        "report",
        help="re-render a run's report",
        description="Re-render pareto.png and report.html of a run folder from its report.json "
        "and print the summary.",
        epilog="example:\n  autocomp report runs/search-5ms",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="run folder holding report.json. Example: runs/search-5ms")
    p.add_argument("--json", action="store_true", help="print report.json. Example: --json")
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "device",
        help="run a measurement agent on a target machine",
        description="Measurement agents: run 'serve' on the target; search and measure reach it "
        "as --device remote://HOST:PORT.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dsub = p.add_subparsers(dest="device_command", metavar="ACTION", parser_class=_Parser)
    s = dsub.add_parser(
        "serve",
        help="serve ONNX latency measurements over HTTP (token required)",
        description=(
            "Serve latency measurements of ONNX models with this machine's 'cpu' device. Only ONNX "
            "is accepted (checked with onnx.checker); every request needs the token."
        ),
        epilog=(
            "example:\n  AUTOCOMP_DEVICE_TOKEN=SECRET autocomp device serve --port 8765\n"
            "  # then, elsewhere: autocomp measure --model m.onnx --device "
            "remote://HOST:8765"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only). Example: --host 0.0.0.0",
    )
    s.add_argument("--port", type=_port, default=8765, help="TCP port. Example: --port 8765")
    s.add_argument(
        "--token",
        default=None,
        help="shared secret clients must send (default: $AUTOCOMP_DEVICE_TOKEN). "
        "Example: --token s3cret",
    )
    s.add_argument(
        "--max-mb",
        type=float,
        default=256.0,
        help="largest accepted model in MB; bigger requests get 413. Example: --max-mb 64",
    )
    s.add_argument("--threads", type=_positive_int, default=1, help=THREADS_HELP)
    s.set_defaults(func=_serve)
    _add_predictor_parser(sub)
    _add_compress_parser(sub)
    return parser


def _add_predictor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predictor",
        help="fit, evaluate and use latency predictors",
        description="Latency predictors fitted from measurement datasets ('autocomp measure "
        "--generate N --out FILE').",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    psub = p.add_subparsers(dest="predictor_command", metavar="ACTION", parser_class=_Parser)
    data_help = "JSONL latency dataset from 'autocomp measure --out'. Example: --data data.jsonl"
    pred_help = "predictor file (.npz). Example: --predictor kernel.npz"
    s = psub.add_parser(
        "fit",
        help="fit a predictor on a dataset",
        description="Fit a latency predictor on a measurement dataset and save it (npz).",
        epilog="example:\n"
        "  autocomp predictor fit --data data.jsonl --kind kernel --out kernel.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--data", required=True, help=data_help)
    s.add_argument(
        "--kind",
        choices=("kernel", "arch", "lut"),
        default="kernel",
        help="kernel: per-kernel regressors, any ONNX model; arch: boosted trees over "
        "encodings; lut: additive per-block table. Example: --kind arch",
    )
    s.add_argument("--out", required=True, help="file to write. Example: --out kernel.npz")
    s.add_argument(
        "--cross-validate",
        action="store_true",
        help="also score the predictor on its own dataset, each model predicted by a fit "
        "without it (5 folds, 5 more fits): how well the data pins it down. "
        "Example: --cross-validate",
    )
    s.add_argument("--json", action="store_true", help="print the summary as JSON. Example: --json")
    s.set_defaults(func=_predictor_fit)
    s = psub.add_parser(
        "eval",
        help="score a predictor on a dataset",
        description="Accuracy of a predictor on a dataset of the same device profile: n, within "
        "±5%%, within ±10%%, RMSE (ms), MAPE, Kendall τ.",
        epilog="example:\n"
        "  autocomp predictor eval --predictor kernel.npz --data test.jsonl --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--predictor", required=True, help=pred_help)
    s.add_argument("--data", required=True, help=data_help)
    s.add_argument("--json", action="store_true", help="print the metrics as JSON. Example: --json")
    s.set_defaults(func=_predictor_eval)
    s = psub.add_parser(
        "predict",
        help="predict an ONNX model's latency",
        description="Predict the latency of an ONNX model with a kernel predictor.",
        epilog="example:\n  autocomp predictor predict --predictor kernel.npz --model m.onnx",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--predictor", required=True, help=pred_help)
    s.add_argument("--model", required=True, help="ONNX file. Example: --model m.onnx")
    s.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        help="input shape, batch first (default: read from the model when static). "
        "Example: --input-shape 1,3,224,224",
    )
    s.add_argument("--json", action="store_true", help="print the result as JSON. Example: --json")
    s.set_defaults(func=_predictor_predict)


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep ratios {text!r} are not like 0.25,0.5,1") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"keep ratios {text!r} must lie in (0, 1]")
    return values


def _bits(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits {text!r} are not like 8,32") from None
    if not values or any(v not in (8, 32) for v in values):
        raise argparse.ArgumentTypeError(f"bits {text!r}: ONNX Runtime runs 8 and 32 only")
    return values


def _add_compress_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="compress an existing model (pruning + int8) under a budget",
        description=(
            "Compress an existing model to meet BUDGET on DEVICE: a joint search over per-group "
            "channel keep ratios (dependency-aware pruning) and per-layer int8/fp32 bits, then "
            "distillation finetuning (+ QAT where int8 calibration loses accuracy), QDQ ONNX "
            "export and verification on the device."
        ),
        epilog=(
            "examples:\n"
            "  autocomp compress --model timm:resnet18 --weights w.pt --data digits "
            "--budget 5ms --device cpu\n"
            "  autocomp compress --model timm:mobilenetv3_large_100 --weights w.pt "
            "--budget 2ms,1MB --quick\n"
            "  autocomp compress --model timm:resnet18 --weights w.pt --budget 100MFLOPs "
            "--importance taylor --keep-ratios 0.5,0.75,1"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="the model: 'timm:NAME', built for the data's classes and channels without "
        "downloading (pretrained=False). Example: --model timm:resnet18",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="state_dict file for the model (torch.load(weights_only=True); without it the "
        "model has random weights). Example: --weights resnet18_digits.pt",
    )
    _add_target_options(p)
    p.add_argument(
        "--resolution",
        type=_positive_int,
        default=None,
        help="input side the model is deployed at (default: the images' side, at least 32). "
        "Example: --resolution 64",
    )
    p.add_argument(
        "--keep-ratios",
        type=_ratios,
        default=KEEP_RATIOS,
        help="keep ratios each channel group chooses from (default: eighths, 0.25 to 1). "
        "Example: --keep-ratios 0.5,0.75,1",
    )
    p.add_argument(
        "--bits",
        type=_bits,
        default=(8, 32),
        help="bitwidths each conv/linear layer chooses from (default 8,32; 32: pruning only). "
        "Example: --bits 32",
    )
    p.add_argument(
        "--importance",
        choices=("l1", "taylor", "fpgm"),
        default="l1",
        help="which channels go first: L1 magnitude, first-order Taylor, or FPGM (default l1). "
        "Example: --importance taylor",
    )
    p.add_argument(
        "--latency",
        choices=("measure", "predict"),
        default="measure",
        help="how candidates' latency is known: measured on the device, or the kernel predictor "
        "calibrated on a few measurements (default measure). Example: --latency predict",
    )
    p.add_argument(
        "--tune-batches",
        type=int,
        default=TUNE_BATCHES,
        help=f"SGD steps (with distillation) on each candidate before scoring it (default "
        f"{TUNE_BATCHES}; 0: BatchNorm recalibration only). Example: --tune-batches 0",
    )
    p.add_argument(
        "--keep-layer",
        action="append",
        default=[],
        metavar="LAYER",
        help="never prune this layer's output channels (repeatable; the classifier is always "
        "kept). Example: --keep-layer conv_stem",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run folder (default runs/compress-<name>-<budget>, numbered when taken). "
        "Example: --out runs/r18-2ms",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (or the latest default folder): reuses its Optuna study "
        "and latency measurements. Example: --resume",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the search and the finetune; the validation split is the same whatever "
        "the seed, so a model trained without it is judged on unseen images. Example: --seed 1",
    )
    p.add_argument(
        "--sampler",
        choices=("tpe", "nsga2", "random"),
        default="tpe",
        help="search algorithm (default tpe). Example: --sampler nsga2",
    )
    p.add_argument(
        "--trials",
        type=_positive_int,
        default=None,
        help="policies evaluated (default 40, 16 with --quick). Example: --trials 100",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="fp32 finetuning epochs of the chosen policy (default 12, 4 with --quick); a quarter "
        "as many QAT epochs follow where calibrated int8 layers lose over 0.5 point of validation "
        "accuracy. Example: --epochs 8",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a fast demo: few trials, short finetune. Example: --quick",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage (default: SQLite in the run folder). Example: --storage study.log",
    )
    _add_outcome_options(p)
    p.set_defaults(func=_compress)


def _compress(args: argparse.Namespace) -> int:
    result = api.compress(
        args.model,
        data=args.data,
        budget=args.budget,
        device=args.device,
        weights=args.weights,
        resolution=args.resolution,
        keep_ratios=args.keep_ratios,
        bits=args.bits,
        importance=args.importance,
        latency=args.latency,
        tune_batches=args.tune_batches,
        ignored_layers=args.keep_layer,
        out=args.out,
        resume=args.resume,
        seed=args.seed,
        sampler=args.sampler,
        trials=args.trials,
        quick=args.quick,
        epochs=args.epochs,
        storage=args.storage,
        threads=args.threads,
        reference=args.reference,
        allow_over_budget=args.allow_over_budget,
        progress=not args.json,
    )
    return _finish_run(result, args)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _finish_run(result: api.Result, args: argparse.Namespace) -> int:
    """Print a search's or compression's report (``--json``: report.json) and say loudly when
    the model misses the budget as measured; the exit status."""
    report = api.report(result.run_dir)
    if args.json:
        _print_json(report)
    else:
        print(f"\nrun folder: {result.run_dir}")
        original = report.get("compress", {}).get("original")
        if original:
            print(
                f"  {'original':<20} accuracy {100 * original['test_accuracy']:.2f}%, latency "
                f"{original['latency_ms']:.3f} ms, {original['macs'] / 1e6:.4g}M MACs, "
                f"{original['params'] / 1e6:.4g}M params"
            )
        for label, value in api.report_rows(report):
            print(f"  {label:<20} {value}")
        for note in report.get("notes", []):
            print(f"  note: {note}")
    if not result.meets_budget:
        print(
            f"autocomp: THE MODEL MISSES THE BUDGET AS MEASURED (see {result.run_dir}/report.json)",
            file=sys.stderr,
        )
        return 0 if args.allow_over_budget else EXIT_OVER_BUDGET
    return 0


def _search(args: argparse.Namespace) -> int:
    result = api.search(
        data=args.data,
        budget=args.budget,
        device=args.device,
        space=args.space,
        out=args.out,
        resume=args.resume,
        seed=args.seed,
        sampler=args.sampler,
        trials=args.trials,
        quick=args.quick,
        supernet=args.supernet,
        storage=args.storage,
        backend=args.backend,
        ray_address=args.ray_address,
        workers=args.workers,
        measure_every=args.measure_every,
        threads=args.threads,
        reference=args.reference,
        allow_over_budget=args.allow_over_budget,
        progress=not args.json,
    )
    return _finish_run(result, args)


def _measure(args: argparse.Namespace) -> int:
    if args.out or args.generate:
        added, total = api.measure_dataset(
            args.out,
            device=args.device,
            threads=args.threads,
            generate=args.generate,
            models=[args.model] if args.model else None,
            input_shape=args.input_shape,
            seed=args.seed,
            batch=args.batch,
            reference=args.reference,
        )
        if args.json:
            _print_json({"out": args.out, "added": added, "records": total})
        else:
            print(f"{args.out}: {added} measurement(s) added, {total} in total")
        return 0
    m = api.measure(
        args.model,
        device=args.device,
        input_shape=args.input_shape,
        threads=args.threads,
        profile=args.profile,
        reference=args.reference,
    )
    if args.json:
        _print_json(m.to_dict())
        return 0
    print(
        f"{m.info.kind} ({m.info.processor}, {m.info.threads} thread(s), batch {m.info.batch}): "
        f"median {m.median_ms:.3f} ms, p10 {m.p10_ms:.3f} ms, p90 {m.p90_ms:.3f} ms "
        f"over {len(m.samples)} runs"
    )
    if m.node_times_ms:
        top = sorted(m.node_times_ms.items(), key=lambda kv: -kv[1])[:15]
        for name, ms in top:
            print(f"  {ms:9.4f} ms  {(m.node_ops or {}).get(name, '?'):<20} {name}")
    return 0


def _devices(args: argparse.Namespace) -> int:
    rows = api.devices()
    if args.json:
        _print_json(rows)
        return 0
    for row in rows:
        state = "available" if row["available"] else f"unavailable: {row['reason']}"
        print(f"{row['spec']:<12} {state}")
        if row.get("info"):
            print(f"{'':<12} profile {row['info']['profile']}")
    return 0


def _data(args: argparse.Namespace) -> int:
    summary = api.describe_data(args.spec, resolution=args.resolution, channels=args.channels)
    if args.json:
        _print_json(summary)
        return 0
    for key, value in summary.items():
        print(f"{key:<14} {value}")
    return 0


def _report(args: argparse.Namespace) -> int:
    report = api.report(args.run_dir)
    if args.json:
        _print_json(report)
        return 0
    for label, value in api.report_rows(report):
        print(f"{label:<20} {value}")
    return 0


def _predictor_fit(args: argparse.Namespace) -> int:
    summary = api.fit_predictor(
        args.data, kind=args.kind, out=args.out, cross_validate=args.cross_validate
    )
    if args.json:
        _print_json(summary)
        return 0
    print(
        f"{summary['kind']} predictor for {summary['profile']} fitted on {summary['n']} "
        f"measurements: {summary['out']}"
    )
    if "cross_validated" in summary:
        print(f"5-fold cross-validated on them: {_scores(summary['cross_validated'])}")
    return 0


def _scores(metrics: dict[str, float]) -> str:
    return (
        f"{metrics['within_5_pct']:.1f}% within ±5%, {metrics['within_10_pct']:.1f}% within "
        f"±10%, RMSE {metrics['rmse_ms']:.3f} ms, MAPE {metrics['mape_pct']:.2f}%, "
        f"Kendall τ {metrics['kendall_tau']:.3f}"
    )


def _predictor_eval(args: argparse.Namespace) -> int:
    metrics = api.evaluate_predictor(args.predictor, args.data)
    if args.json:
        _print_json(metrics)
        return 0
    print(
        f"{metrics['kind']} predictor on {metrics['n']} models ({metrics['profile']}): "
        f"{_scores(metrics)}"
    )
    return 0


def _predictor_predict(args: argparse.Namespace) -> int:
    result = api.predict_latency(args.predictor, args.model, input_shape=args.input_shape)
    if args.json:
        _print_json(result)
        return 0
    print(f"{result['model']}: {result['latency_ms']:.3f} ms predicted ({result['profile']})")
    for k in result["top_kernels"]:
        print(f"  {k['ms']:9.4f} ms  {k['op']:<22} {k['name']}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    api.serve_device(
        host=args.host,
        port=args.port,
        token=args.token,
        max_bytes=int(args.max_mb * 1e6),
        threads=args.threads,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            raise AutocompError("a command is required (see 'autocomp --help')")
        return args.func(args)
    except AutocompError as err:
        print(f"autocomp: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("autocomp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
