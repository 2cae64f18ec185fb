"""Prune -> repair -> score on a session: what every plan, baseline and search candidate goes through.

A ``Pruning`` (counts, an N:M pattern or keep-masks) is applied to a copy of the session's dense model, the
copy is repaired on the calibration split with a pipeline, and ``score`` compares a model with the dense one
on any split. The session's dense model is never changed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from .nn.metrics import Metrics, compare_logits, logits_of
from .nn.pruning import Pruning, apply_masks
from .repair import DEFAULT_REPAIR, DEFAULT_WITHOUT_BN, RepairPipeline, RepairReport, run_repair
from .session import Session

__all__ = ["PruningLike", "repaired_model", "score"]

PruningLike = Pruning | Mapping[str, int] | Mapping[str, torch.Tensor]
DEFAULT_PIPELINES = (DEFAULT_REPAIR, DEFAULT_WITHOUT_BN)


def repaired_model(
    session: Session,
    pruning: PruningLike,
    repair: str | RepairPipeline,
    nm: tuple[int, int] | None = None,
    progress: bool = False,
) -> tuple[nn.Module, RepairReport]:
    """Prune and repair a copy of the dense model (``nm``: the pattern of explicit keep-masks)."""
    p = Pruning.of(pruning, nm)
    masks = p.keep_masks(session.dense)
    model = copy.deepcopy(session.dense)
    apply_masks(model, masks)
    pipeline = RepairPipeline.parse(repair) if isinstance(repair, str) else repair
    report = run_repair(
        model,
        pipeline,
        session.splits.calib,
        device=session.device,
        cache=session.site_cache,
        masks=masks,
        nm=p.nm,
        optional_sites=str(pipeline) in DEFAULT_PIPELINES,  # sites nobody chose: skip what the model lacks
        progress=progress,
        seed=session.cfg.seed,
        distill_batches=session.splits.distill,
    )
    return model, report


def score(session: Session, model: nn.Module, splits: tuple[str, ...] = ("test",)) -> dict[str, Metrics]:
    """``model`` against the dense model on each of ``splits`` (agreement, KL, top-1 where labelled)."""
    out = {}
    for split in splits:
        dense_logits, labels = session.dense_logits(split)
        logits, _ = logits_of(model, session.split(split), session.device)
        out[split] = compare_logits(logits, labels, dense_logits)
    return out
