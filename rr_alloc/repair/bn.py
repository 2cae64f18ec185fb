"""BatchNorm recalibration ("BN only"), as in REPAIR / airbench."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["recalibrate_bn", "batchnorms"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]], device: torch.device | str = "cpu"
) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches``.

    Only the BatchNorm modules run in train mode (Dropout and the rest stay in
    eval); ``momentum=None`` gives the cumulative average over all batches, so
    the result does not depend on batch order and a second call gives the
    same statistics (idempotent). Returns the number of BatchNorms updated.
    """
    bns = batchnorms(model)
    if not bns:
        return 0
    was_training = model.training
    saved = [(bn, bn.momentum) for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for x, _ in batches:
            model(x.to(device))
    finally:
        for bn, mom in saved:
            bn.momentum = mom
        model.train(was_training)
    return len(bns)
