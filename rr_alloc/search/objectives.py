"""What a search minimises per image: KL to the dense logits (label-free), disagreement with the dense top-1,
or top-1 error (needs labels). ``--objective`` takes its choices from ``OBJECTIVES``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["OBJECTIVES", "per_image_losses"]

OBJECTIVES = ("kl", "agreement", "top1")


def per_image_losses(
    logits: torch.Tensor, labels: torch.Tensor, dense_logits: torch.Tensor, objective: str
) -> np.ndarray:
    """Loss of each image: KL(p_dense || p_model), 1 - agreement with the dense top-1, or 1 - correct."""
    if objective == "kl":
        logp_d = F.log_softmax(dense_logits.double(), 1)
        logp = F.log_softmax(logits.double(), 1)
        return (logp_d.exp() * (logp_d - logp)).sum(1).numpy()
    pred = logits.argmax(1)
    ref = dense_logits.argmax(1) if objective == "agreement" else labels
    return (pred != ref).double().numpy()
