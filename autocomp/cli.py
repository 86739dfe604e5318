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

EXIT_BAD_INPUT = 2


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
    p.add_argument(
        "--budget",
        required=True,
        help=f"upper bounds to meet; {ACCEPTED_FORMS}. FLOPs = 2·MACs. Example: --budget 5ms",
    )
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--data", default="digits", help=DATA_HELP)
    p.add_argument("--threads", type=_positive_int, default=1, help=THREADS_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON. Example: --json")
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
            "  autocomp measure --model m.onnx --device remote://127.0.0.1:8765 --profile"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="ONNX file to time. Example: --model m.onnx")
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
    return parser


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _search(args: argparse.Namespace) -> int:
    try:
        api.search(budget=args.budget, device=args.device, data=args.data, threads=args.threads)
    except NotImplementedError as err:
        print(f"autocomp: {err}", file=sys.stderr)
    return 0


def _measure(args: argparse.Namespace) -> int:
    m = api.measure(
        args.model,
        device=args.device,
        input_shape=args.input_shape,
        threads=args.threads,
        profile=args.profile,
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
