"""The model to compress: ``timm:NAME`` (random init unless a state_dict is given) or a module."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from autocomp.errors import AutocompError
from autocomp.hardware.onnx_io import one_line

MODEL_FORMS = "'timm:NAME' (e.g. timm:resnet18), or an nn.Module from Python"


def timm_model(
    spec: str, *, num_classes: int, in_channels: int, weights: str | Path | None = None
) -> nn.Module:
    """``timm:NAME`` built for the data (``num_classes``, ``in_channels``), never downloading:
    ``pretrained=False``, then ``weights`` (a state_dict file, loaded with
    ``torch.load(weights_only=True)``) if given."""
    import timm

    kind, _, name = spec.partition(":")
    if kind != "timm" or not name:
        raise AutocompError(f"unknown model {spec!r}; use {MODEL_FORMS}")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise AutocompError(f"unknown timm model {name!r}{hint}")
    state = load_state_dict(weights) if weights is not None else None
    try:
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels
        )
    except Exception as err:
        raise AutocompError(f"timm cannot build {name!r}: {one_line(err)}") from None
    if state is not None:
        fit_state(model, state, f"{weights} for timm:{name}")
    return model.eval()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict file, read safely (``weights_only=True``); a ``{"state_dict": ...}`` wrapper
    (autocomp's model.pt) is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise AutocompError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise AutocompError(f"cannot read weights {path}: {one_line(err)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AutocompError(f"{path} is not a state_dict (a mapping of names to tensors)")
    return state


def fit_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` strictly; a mismatch is one line naming the first culprit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensor(s) of another shape (first {k!r}: "
                f"{tuple(state[k].shape)} vs {tuple(own[k].shape)})"
            )
        if missing:
            parts.append(f"{len(missing)} missing (first {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
        raise AutocompError(f"weights {what} do not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)
