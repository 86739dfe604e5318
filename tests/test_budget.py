"""Budget parsing: every accepted form, and the exact error behaviour for malformed ones."""

import pytest

from autocomp import cli
from autocomp.budget import Budget
from autocomp.errors import AutocompError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5ms", Budget(latency_ms=5.0)),
        ("5 ms", Budget(latency_ms=5.0)),
        ("500us", Budget(latency_ms=0.5)),
        ("500µs", Budget(latency_ms=0.5)),
        ("0.005s", Budget(latency_ms=5.0)),
        ("2.5MS", Budget(latency_ms=2.5)),
        ("300MFLOPs", Budget(flops=300e6)),
        ("1.2 GFLOPs", Budget(flops=1.2e9)),
        ("150M MACs", Budget(flops=300e6)),
        ("150MMACs", Budget(flops=300e6)),
        ("1.5M params", Budget(params=1.5e6)),
        ("200k params", Budget(params=200e3)),
        ("2MB", Budget(size_bytes=2e6)),
        ("512KB", Budget(size_bytes=512e3)),
        ("1MiB", Budget(size_bytes=2**20)),
        ("100000B", Budget(size_bytes=1e5)),
        ("5ms,2MB", Budget(latency_ms=5.0, size_bytes=2e6)),
        (" 5ms , 300MFLOPs , 1M params ", Budget(latency_ms=5, flops=300e6, params=1e6)),
        ("1e-3s", Budget(latency_ms=1.0)),
        (".5ms", Budget(latency_ms=0.5)),
    ],
)
def test_valid_budgets(text, expected):
    assert Budget.parse(text) == expected


def test_macs_convention_and_terms():
    b = Budget.parse("150M MACs,5ms")
    assert b.flops == 300e6 and b.macs == 150e6
    assert b.terms() == {"latency_ms": 5.0, "flops": 300e6}
    assert str(Budget.parse(str(b))) == str(b)


def test_violations():
    b = Budget.parse("5ms,2MB")
    assert b.is_met(latency_ms=4.9, size_bytes=2e6)
    assert b.violations(latency_ms=5.1, size_bytes=1e6) == {"latency_ms": (5.1, 5.0)}
    with pytest.raises(ValueError, match="no size_bytes cost"):
        b.violations(latency_ms=1.0)


MALFORMED = [
    ("", "empty budget"),
    ("   ", "empty budget"),
    ("5", "unknown unit"),
    ("fast", "cannot parse budget term"),
    ("5 parsecs", "unknown unit"),
    ("ms", "cannot parse budget term"),
    ("-5ms", "cannot parse budget term"),
    ("0ms", "must be a positive finite number"),
    ("0MB", "must be a positive finite number"),
    ("5ms,", "cannot parse budget term"),
    (",5ms", "cannot parse budget term"),
    ("5ms,,2MB", "cannot parse budget term"),
    ("5ms,6ms", "gives latency_ms twice"),
    ("300MFLOPs,150M MACs", "gives flops twice"),
    ("5ms 2MB", "cannot parse budget term"),
    ("5xs", "unknown unit"),
    ("1e999ms", "must be a positive finite number"),
    ("nanms", "cannot parse budget term"),
    ("inf ms", "cannot parse budget term"),
    ("5mss", "unknown unit"),
    ("3 Zparams", "unknown unit"),
    ("5ms;2MB", "cannot parse budget term"),
    ("1.2.3ms", "cannot parse budget term"),
    ("0x10ms", "cannot parse budget term"),
]


@pytest.mark.parametrize(("text", "phrase"), MALFORMED)
def test_malformed_budget_api(text, phrase):
    with pytest.raises(AutocompError, match=phrase):
        Budget.parse(text)


@pytest.mark.parametrize(("text", "phrase"), MALFORMED)
def test_malformed_budget_cli(text, phrase, capsys):
    code = cli.main(["search", f"--budget={text}", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("autocomp: error: ")
    assert phrase in lines[0]
    assert "Traceback" not in err
