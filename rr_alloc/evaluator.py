"""Prune -> repair -> score: what every plan, baseline and search candidate goes through.

The evaluator prunes a copy of the experiment's dense model (a ``Pruning``: counts, an N:M pattern or
keep-masks), repairs it on the calibration split with a pipeline, and compares it with the dense model on
any split. Dense statistics that repair steps reuse (site moments) are cached across plans.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from .evaluate import Metrics, compare_logits, logits_of
from .experiment import Experiment
from .pruning import Pruning, apply_masks, parse_pattern
from .repair import DEFAULT_REPAIR, DenseSiteCache, RepairPipeline, RepairReport, run_repair
from .selection import SelectionScorer

__all__ = ["Evaluator", "PruningLike"]

PruningLike = Pruning | Mapping[str, int] | Mapping[str, torch.Tensor]


class Evaluator:
    """Prunes, repairs and scores plans on one ``Experiment``."""

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        self.site_cache = DenseSiteCache(experiment.dense, experiment.splits.calib, experiment.device)
        self.last_report: RepairReport | None = None  # of the last verified plan: what the repair did

    @property
    def nm(self) -> tuple[int, int] | None:
        """The run's N:M pattern (``cfg.pattern``), or ``None`` for unstructured plans."""
        pattern = self.experiment.cfg.pattern
        return parse_pattern(pattern) if pattern else None

    def pruning(self, counts: Mapping[str, int] | None = None) -> Pruning:
        """The run's pruning: its N:M pattern over every layer, else the given per-layer ``counts``."""
        nm = self.nm
        if nm is not None:
            return Pruning(nm=nm, layers=tuple(layer.name for layer in self.experiment.layers))
        if counts is None:
            raise ValueError("an unstructured run prunes per-layer counts: pass them")
        return Pruning(counts=dict(counts))

    def nm_pruning(self, n: int = 2, m: int = 4) -> Pruning:
        """N:M magnitude pruning of every layer (layers whose inputs are not a multiple of ``m`` stay dense)."""
        return Pruning(nm=(n, m), layers=tuple(layer.name for layer in self.experiment.layers))

    def repaired_model(
        self,
        pruning: PruningLike,
        repair: str | RepairPipeline,
        nm: tuple[int, int] | None = None,
        progress: bool = False,
    ) -> tuple[nn.Module, RepairReport]:
        """Prune and repair a copy of the dense model (``nm``: the pattern of explicit keep-masks)."""
        p = Pruning.of(pruning, nm)
        exp = self.experiment
        masks = p.keep_masks(exp.dense)
        model = copy.deepcopy(exp.dense)
        apply_masks(model, masks)
        pipeline = RepairPipeline.parse(repair) if isinstance(repair, str) else repair
        report = run_repair(
            model,
            pipeline,
            exp.splits.calib,
            device=exp.device,
            cache=self.site_cache,
            masks=masks,
            nm=p.nm,
            optional_sites=str(pipeline) == DEFAULT_REPAIR,  # sites nobody chose: skip what the model lacks
            progress=progress,
            seed=exp.cfg.seed,
            distill_batches=exp.splits.distill,
        )
        return model, report

    def verify(
        self, pruning: PruningLike, repair: str | RepairPipeline, split: str = "test", nm: tuple[int, int] | None = None
    ) -> Metrics:
        """Prune -> repair on calibration -> evaluate on ``split`` against the dense model."""
        return self.verify_splits(pruning, repair, (split,), nm=nm)[split]

    def verify_splits(
        self,
        pruning: PruningLike,
        repair: str | RepairPipeline,
        splits: tuple[str, ...],
        nm: tuple[int, int] | None = None,
    ) -> dict[str, Metrics]:
        """One prune + repair, evaluated on several splits (e.g. selection for choosing, test for reporting)."""
        model, self.last_report = self.repaired_model(pruning, repair, nm=nm, progress=self.experiment.progress)
        exp = self.experiment
        out = {}
        for split in splits:
            dense_logits, labels = exp.dense_logits(split)
            logits, _ = logits_of(model, exp.split(split), exp.device)
            out[split] = compare_logits(logits, labels, dense_logits)
        return out

    def scorer(self, repair: str, objective: str = "kl", screen_size: int | None = None) -> SelectionScorer:
        """Per-image losses of candidates on the selection split, with a screen of ``screen_size`` images."""
        return SelectionScorer(self, repair, objective, screen_size)

    def __repr__(self) -> str:
        return f"Evaluator({self.experiment.cfg.model}, {len(self.experiment.layers)} layers)"
