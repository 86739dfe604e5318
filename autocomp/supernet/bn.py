"""BatchNorm recalibration: the statistics a subnet needs are not the supernet's.

Running statistics accumulated while training a weight-sharing supernet mix every sampled subnet,
so a subnet evaluated with them is scored unfairly (OFA, BigNAS). Recomputing them from a few
training-split batches with the subnet active costs a handful of forward passes and fixes that.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Tensor | tuple[Tensor, ...] | list[Tensor]],
    *,
    max_batches: int = 20,
) -> nn.Module:
    """Reset every BatchNorm's running stats and recompute them as an exact average over batches.

    ``batches`` yields inputs (or ``(inputs, labels)`` pairs) already shaped for ``model`` — for a
    supernet, at the active candidate's resolution — and must come from the *training* split, never
    the data the model is scored on. Momentum is set to ``None`` (cumulative average) for the pass
    and restored afterwards, as is the model's train/eval mode. Works on a supernet with an active
    candidate (only the active slices are touched) and on a standalone module alike.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        seen = 0
        for batch in batches:
            if seen >= max_batches:
                break
            model(batch[0] if isinstance(batch, tuple | list) else batch)
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_bn needs at least one batch")
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return model
