"""End-to-end scores of a plan on the selection split: what search allocators minimise."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .errors import UserError

__all__ = ["OBJECTIVES", "make_objective"]

OBJECTIVES = ("kl", "agreement", "top1")


def make_objective(wb: Any, repair: str, objective: str = "kl") -> Callable[[np.ndarray], float]:
    """Loss of per-layer counts (in ``wb.layers`` order) on the selection split.

    ``kl``: mean KL to the dense logits (label-free); ``agreement``: 1 - top-1 agreement with
    the dense model; ``top1``: 1 - top-1 (needs labels). The plan is pruned and repaired with
    ``repair`` on the calibration split, as ``verify`` does.
    """
    if objective not in OBJECTIVES:
        raise UserError(f"unknown --objective {objective!r}: use {', '.join(OBJECTIVES)}")
    if wb.splits.selection.n == 0:
        raise UserError("a search allocator needs a selection split: pass --selection-size > 0")
    names = [l.name for l in wb.layers]

    def evaluate(counts: np.ndarray) -> float:
        m = wb.verify(dict(zip(names, (int(k) for k in counts))), repair, split="selection")
        return {"kl": m.kl, "agreement": 1.0 - m.agreement, "top1": 1.0 - m.top1}[objective]

    return evaluate
