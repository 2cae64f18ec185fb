"""Prune -> repair -> score on a session: what every plan, baseline and search candidate goes through.

A ``Pruning`` (counts, an N:M pattern or keep-masks) is applied to a copy of the session's dense model, the
copy is repaired on the calibration split with a pipeline, and ``score`` compares a model with the dense one
on any split. The session's dense model is never changed.

The last few repaired copies are kept on the session (``RepairedCopies``, by plan and pipeline): a search
scores every rule, validates its anchor and is verified, and the study that compares the rules repairs the
same plans again; a kept copy answers them all with one repair each.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .nn.metrics import Metrics, compare_logits, logits_of
from .nn.pruning import Pruning, apply_masks
from .repair import DEFAULT_REPAIR, DEFAULT_WITHOUT_BN, RepairPipeline, RepairReport, run_repair
from .session import Session

__all__ = ["PruningLike", "RepairedCopies", "kept_copies", "repaired_model", "score"]

PruningLike = Pruning | Mapping[str, int] | Mapping[str, torch.Tensor]
DEFAULT_PIPELINES = (DEFAULT_REPAIR, DEFAULT_WITHOUT_BN)


class RepairedCopies:
    """The most recently used repaired models of a session, by (plan, pipeline): at most ``size`` of them and
    ``max_bytes`` of parameters and buffers, so a long search over a large model cannot fill the memory."""

    def __init__(self, size: int = 8, max_bytes: int = 1 << 30) -> None:
        self.size, self.max_bytes = size, max_bytes
        self.kept: OrderedDict[Any, tuple[nn.Module, RepairReport, int]] = OrderedDict()

    @staticmethod
    def key(p: Pruning, pipeline: RepairPipeline) -> Any | None:
        """What decides a repaired copy on one session; ``None`` for explicit masks (not worth hashing)."""
        if p.masks is not None:
            return None
        counts = tuple(sorted(p.counts.items())) if p.counts is not None else None
        return counts, p.nm, tuple(p.layers), pipeline  # the pipeline's steps with all their settings

    def clear(self) -> None:
        self.kept.clear()

    def get(self, key: Any) -> tuple[nn.Module, RepairReport] | None:
        if key not in self.kept:
            return None
        self.kept.move_to_end(key)
        model, report, _ = self.kept[key]
        return copy.deepcopy(model), copy.deepcopy(report)  # callers may change theirs (export, distillation)

    def put(self, key: Any, model: nn.Module, report: RepairReport) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        if nbytes > self.max_bytes:
            return
        self.kept[key] = (copy.deepcopy(model), copy.deepcopy(report), nbytes)
        self.kept.move_to_end(key)
        while len(self.kept) > self.size or sum(b for *_, b in self.kept.values()) > self.max_bytes:
            self.kept.popitem(last=False)


def kept_copies(session: Session) -> RepairedCopies:
    """The session's kept repaired copies (benchmarks clear them to time the repair itself)."""
    return session.memo.setdefault(("repaired copies",), RepairedCopies())


def repaired_model(
    session: Session,
    pruning: PruningLike,
    repair: str | RepairPipeline,
    nm: tuple[int, int] | None = None,
    progress: bool = False,
) -> tuple[nn.Module, RepairReport]:
    """Prune and repair a copy of the dense model (``nm``: the pattern of explicit keep-masks); a plan this
    session repaired lately with the same pipeline is copied from the kept result (``RepairedCopies``)."""
    p = Pruning.of(pruning, nm)
    pipeline = RepairPipeline.parse(repair) if isinstance(repair, str) else repair
    kept = kept_copies(session)
    key = kept.key(p, pipeline)
    if key is not None and (hit := kept.get(key)) is not None:
        return hit
    masks = p.keep_masks(session.dense)
    model = copy.deepcopy(session.dense)
    apply_masks(model, masks)
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
    if key is not None:
        kept.put(key, model, report)
    return model, report


def score(session: Session, model: nn.Module, splits: tuple[str, ...] = ("test",)) -> dict[str, Metrics]:
    """``model`` against the dense model on each of ``splits`` (agreement, KL, top-1 where labelled)."""
    out = {}
    for split in splits:
        dense_logits, labels = session.dense_logits(split)
        logits, _ = logits_of(model, session.split(split), session.device)
        out[split] = compare_logits(logits, labels, dense_logits)
    return out
