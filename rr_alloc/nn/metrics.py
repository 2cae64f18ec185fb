"""Evaluation: top-1 against labels, and label-free agreement and KL against the dense model."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Metrics", "logits_of", "per_image", "compare_logits", "wilson_interval"]


@dataclass(frozen=True)
class Metrics:
    """``top1``/``agreement`` are fractions in [0, 1] (``top1`` is ``None`` on unlabelled images);
    ``kl`` = mean KL(p_dense || p_model) in nats."""

    top1: float | None
    agreement: float
    kl: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def logits_of(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (on CPU, float32) and labels for ``batches``, model in eval mode."""
    was = model.training
    model.eval()
    outs, ys = [], []
    try:
        for x, y in batches:
            outs.append(model(x.to(device)).float().cpu())
            ys.append(y)
    finally:
        model.train(was)
    return torch.cat(outs), torch.cat(ys)


def per_image(logits: torch.Tensor, dense_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: agreement with the dense model's top-1 (0/1) and KL(p_dense || p_model) in nats (float64)."""
    agree = (logits.argmax(1) == dense_logits.argmax(1)).double()
    logp_d = F.log_softmax(dense_logits.double(), 1)
    logp = F.log_softmax(logits.double(), 1)
    # KL is never negative: rounding leaves about -1e-17 on a model equal to the dense one (printed as -0.0)
    return agree, (logp_d.exp() * (logp_d - logp)).sum(1).clamp_min(0.0)


def compare_logits(logits: torch.Tensor, labels: torch.Tensor, dense_logits: torch.Tensor) -> Metrics:
    """Metrics of ``logits`` against ``labels`` and the dense model's logits on the same images (no top-1 where
    the images are unlabelled: label -1)."""
    labelled = bool(len(labels)) and bool((labels >= 0).all())
    top1 = float((logits.argmax(1) == labels).double().mean()) if labelled else None
    agree, kl = per_image(logits, dense_logits)
    return Metrics(top1, float(agree.mean()), float(kl.mean()), len(labels))


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion ``p`` measured on ``n`` images."""
    if n == 0:
        return (float("nan"), float("nan"))
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return centre - half, centre + half
