"""Search spaces: YAML files describing families of networks, and their candidates.

``get_space("mbv3")`` loads a built-in space (``search_spaces/mbv3.yaml``, shipped as package
data); ``get_space("path/to/my.yaml")`` loads a user's copy. The file's ``family`` key picks the
implementation.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from autocomp.errors import AutocompError
from autocomp.spaces.base import Param, Plan, SearchSpace
from autocomp.spaces.candidate import Candidate, Cost
from autocomp.spaces.mbv3 import MobileNetV3Space
from autocomp.spaces.resnet import ResNetSpace
from autocomp.spaces.schema import read_yaml

FAMILIES: dict[str, type[SearchSpace]] = {"mbv3": MobileNetV3Space, "resnet": ResNetSpace}

__all__ = ["Candidate", "Cost", "Param", "Plan", "SearchSpace", "builtin_spaces", "get_space"]


def builtin_spaces() -> list[str]:
    """Names of the shipped spaces."""
    root = files("autocomp.builtin_spaces")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def get_space(
    name_or_path: str | Path,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    max_resolution: int | None = None,
) -> SearchSpace:
    """Load a built-in space by name or a YAML file by path.

    ``num_classes`` and ``in_channels`` are the defaults used by ``cost``, ``supernet`` and
    ``build`` when they are not given explicitly. ``max_resolution`` drops the input resolutions
    above it (keeping at least the smallest): upsampling small images far beyond their own size
    adds training cost, not information.
    """
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        path, name = Path(text), Path(text).stem
        if not path.is_file():
            raise AutocompError(f"search space file not found: {path}")
        config, source = read_yaml(path), str(path)
    else:
        resource = files("autocomp.builtin_spaces").joinpath(f"{text}.yaml")
        if not resource.is_file():
            raise AutocompError(
                f"unknown search space {text!r} (built-in: {', '.join(builtin_spaces())}; "
                "or give the path of a .yaml file)"
            )
        config, source, name = read_yaml(Path(str(resource))), f"{text}.yaml", text
    if max_resolution is not None and isinstance(config.get("resolution"), list):
        sides = config["resolution"]
        config["resolution"] = [r for r in sides if r <= max_resolution] or sides[:1]
    family = config.get("family")
    if family not in FAMILIES:
        raise AutocompError(
            f"search space {source}: key 'family': {family!r} is not one of {sorted(FAMILIES)}"
        )
    return FAMILIES[family](name, config, source, num_classes=num_classes, in_channels=in_channels)
