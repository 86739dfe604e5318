"""Tiny versions of the built-in spaces (same families, few channels) for fast exact tests."""

from __future__ import annotations

from pathlib import Path

from autocomp.spaces import SearchSpace, get_space

TINY_MBV3 = """
family: mbv3
resolution: [16, 24, 32]
keep_ratio: [0.5, 0.75, 1.0]
bits: [8, 32]
stem: {width: 8, stride: 2, act: hswish}
stages:
  - {depth: [1], width: [8], kernel: [3], expand: [1], stride: 1, se: false, act: relu}
  - depth: [1, 2, 3]
    width: [8, 16]
    kernel: [3, 5, 7]
    expand: [2, 3]
    stride: 2
    se: true
    act: relu
  - {depth: [1, 2], width: [16, 24], kernel: [3, 5], expand: [2, 4], stride: 2, se: false,
     act: hswish}
head: {width: 32, hidden: 48, act: hswish}
"""

TINY_RESNET = """
family: resnet
block: {block}
resolution: [16, 24, 32]
keep_ratio: [0.5, 1.0]
bits: [8, 32]
stem: {{width: 8, kernel: 3, stride: 2}}
stages:
  - {{depth: [1, 2], width: [8, 16], ratio: [0.5, 1.0], stride: 1}}
  - {{depth: [1, 2, 3], width: [16, 24], ratio: [0.5, 0.75], stride: 2}}
"""

TINY = {
    "mbv3": TINY_MBV3,
    "resnet-basic": TINY_RESNET.format(block="basic"),
    "resnet-bottleneck": TINY_RESNET.format(block="bottleneck"),
}


def tiny_space(kind: str, folder: Path, **kwargs: int) -> SearchSpace:
    """Write the tiny YAML of ``kind`` into ``folder`` and load it as a user space file."""
    path = folder / f"tiny-{kind}.yaml"
    path.write_text(TINY[kind])
    return get_space(str(path), **kwargs)
