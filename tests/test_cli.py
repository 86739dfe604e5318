"""The command line reads well: every option is explained with an example; usage errors are one
line and exit 2."""

import argparse
import subprocess
import sys

import pytest

from autocomp import cli


def _all_parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


PARSERS = list(_all_parsers(cli.build_parser()))


@pytest.mark.parametrize(
    ("path", "parser"), PARSERS, ids=[" ".join(p) or "autocomp" for p, _ in PARSERS]
)
def test_every_option_has_help_with_example(path, parser):
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"{' '.join(path)} {action.dest} has no help"
        assert "example" in action.help.lower(), f"{' '.join(path)} {action.dest}: {action.help}"


def test_commands_have_examples_in_help():
    for path, parser in PARSERS:
        if path and any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            continue  # a group ('device', 'predictor'): its actions carry the examples
        assert "example" in parser.format_help().lower(), path


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        ([], "a command is required"),
        (["frobnicate"], "invalid choice"),
        (["search"], "the following arguments are required: --budget"),
        (["measure", "--model", "m.onnx", "--threads", "0"], "must be positive"),
        (["measure", "--model", "m.onnx", "--input-shape", "1,a"], "not like 1,3,224,224"),
        (["device", "serve", "--port", "70000"], "above 65535"),
        (["search", "--budget", "5ms", "--bogus"], "unrecognized arguments: --bogus"),
        (
            ["search", "--budget", "5ms", "--device", "torch-cpu", "--reference", "--out", "{t}"],
            "--reference times on the local cpu device only",
        ),
        (
            [
                *["compress", "--model", "timm:resnet18", "--budget", "5ms"],
                *["--device", "torch-cpu", "--reference", "--out", "{t}"],
            ],
            "--reference times on the local cpu device only",
        ),
    ],
)
def test_usage_errors_are_one_line(argv, phrase, capsys, tmp_path):
    run = tmp_path / "run"
    assert cli.main([a.format(t=run) for a in argv]) == 2
    assert not run.exists()
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("autocomp: error: ")
    assert phrase in err


def test_help_runs_as_a_program():
    proc = subprocess.run(
        [sys.executable, "-m", "autocomp.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "autocomp search --budget 5ms --device cpu" in proc.stdout


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("meets_budget", [True, False])
def test_run_summary_and_exit_status(monkeypatch, capsys, tmp_path, compressed, meets_budget):
    report = {"notes": ["a note"]}
    if compressed:
        original = {"test_accuracy": 0.9, "latency_ms": 2.0, "macs": 3e6, "params": 1e5}
        report["compress"] = {"original": original}
    monkeypatch.setattr(cli.api, "report", lambda run_dir: report)
    monkeypatch.setattr(cli.api, "report_rows", lambda r: [("accuracy", "91.00%")])
    result = cli.api.Result(None, tmp_path / "model.onnx", {}, [], tmp_path, meets_budget)
    for allow in (False, True):
        args = argparse.Namespace(json=False, allow_over_budget=allow)
        code = cli._finish_run(result, args)
        out, err = capsys.readouterr()
        assert code == (0 if meets_budget or allow else cli.EXIT_OVER_BUDGET)
        assert f"run folder: {tmp_path}" in out and "accuracy" in out and "note: a note" in out
        assert ("original" in out) == compressed
        assert ("MISSES THE BUDGET AS MEASURED" in err) == (not meets_budget)
