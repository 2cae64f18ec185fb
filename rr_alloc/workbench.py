"""The workbench: one experiment, its evaluator and search runner, and the plans allocated on them.

``Workbench(cfg)`` loads an ``Experiment`` once; ``allocate`` returns per-layer pruned counts for any
registered allocator (deterministic ones memoised; the search through the ``SearchRunner``), and
``make_plan`` builds the plan document. Pruning, repair and scoring are the ``Evaluator``'s.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any

import torch
from torch import nn

from .allocators import AllocationProblem, Needs, allocator_class, get_allocator
from .config import RunConfig
from .data import Batches, Splits
from .evaluate import Metrics
from .evaluator import Evaluator, PruningLike
from .experiment import Experiment, layer_macs
from .layers import LayerInfo
from .plan import LayerPlan, Plan
from .profile import RRProfile
from .pruning import Pruning
from .repair import RepairPipeline, RepairReport
from .search_runner import SearchRunner

__all__ = ["Workbench", "layer_macs"]


class Workbench:
    """Build once from a ``RunConfig``; then allocate, prune, repair and verify plans."""

    def __init__(self, cfg: RunConfig, progress: bool = True) -> None:
        self.experiment = Experiment(cfg, progress)
        self.evaluator = Evaluator(self.experiment)
        self.search = SearchRunner(self.experiment, self.evaluator, progress)
        self._allocations: dict[tuple, dict[str, int]] = {}

    # the experiment's parts, as every caller reads them
    @property
    def cfg(self) -> RunConfig:
        return self.experiment.cfg

    @property
    def dense(self) -> nn.Module:
        return self.experiment.dense

    @property
    def layers(self) -> list[LayerInfo]:
        return self.experiment.layers

    @property
    def splits(self) -> Splits:
        return self.experiment.splits

    @property
    def device(self) -> torch.device:
        return self.experiment.device

    @property
    def timings(self) -> dict[str, float]:
        return self.experiment.timings

    def split(self, name: str) -> Batches:
        return self.experiment.split(name)

    def dense_logits(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.experiment.dense_logits(split)

    def dense_metrics(self, split: str = "test") -> Metrics:
        return self.experiment.dense_metrics(split)

    def profile(self) -> RRProfile:
        return self.experiment.profile()

    def problem(self, budget: float, needs: Needs = Needs(), layer_weights: str | None = None) -> AllocationProblem:
        return self.experiment.problem(budget, needs, layer_weights)

    def achieved(self, counts: dict[str, int]) -> float:
        return self.experiment.achieved(counts)

    # the evaluator's
    @property
    def nm(self) -> tuple[int, int] | None:
        return self.evaluator.nm

    def pruning(self, counts: dict[str, int] | None = None) -> Pruning:
        return self.evaluator.pruning(counts)

    def repaired_model(
        self, pruning: PruningLike, repair: str | RepairPipeline, nm: tuple[int, int] | None = None
    ) -> tuple[nn.Module, RepairReport]:
        return self.evaluator.repaired_model(pruning, repair, nm)

    def verify(
        self, pruning: PruningLike, repair: str | RepairPipeline, split: str = "test", nm: tuple[int, int] | None = None
    ) -> Metrics:
        return self.evaluator.verify(pruning, repair, split, nm)

    def verify_splits(
        self,
        pruning: PruningLike,
        repair: str | RepairPipeline,
        splits: tuple[str, ...],
        nm: tuple[int, int] | None = None,
    ) -> dict[str, Metrics]:
        return self.evaluator.verify_splits(pruning, repair, splits, nm)

    # the search runner's
    @property
    def search_info(self) -> dict[float, dict[str, Any]]:
        """Budget -> provenance of the last search there (the plan's ``search`` block)."""
        return {b: p.to_dict() for b, p in self.search.provenance.items()}

    @property
    def last_study(self) -> Any:
        return self.search.last_study

    # ------------------------------------------------------------ allocation
    def allocate(
        self, allocator: str, budget: float, layer_weights: str | None = None, **kwargs: Any
    ) -> dict[str, int]:
        """``{layer name: pruned count}`` for ``allocator`` at ``budget`` (deterministic ones memoised)."""
        cls = allocator_class(allocator)
        t0 = time.perf_counter()
        if cls.needs.evaluate:  # the search depends on its storage: never memoised
            counts = self.search.run(budget, self.allocate("global", budget))
        else:
            key = (allocator, float(budget), layer_weights or self.cfg.layer_weights, tuple(sorted(kwargs.items())))
            if key not in self._allocations:
                k = get_allocator(allocator, **kwargs).allocate(
                    self.experiment.problem(budget, cls.needs, layer_weights)
                )
                self._allocations[key] = {layer.name: int(v) for layer, v in zip(self.layers, k)}
            counts = dict(self._allocations[key])
        self.timings[f"allocate:{allocator}"] = time.perf_counter() - t0
        return counts

    # ------------------------------------------------------------------ plan
    def make_plan(
        self, counts: dict[str, int], budget: float, allocator: str, repair: str, verify: dict[str, Any] | None = None
    ) -> Plan:
        """The plan document for ``counts``, with everything needed to rebuild and verify it."""
        exp, cfg = self.experiment, self.cfg
        pipe = RepairPipeline.parse(repair)
        prof = exp.profile_meta
        return Plan(
            layers=[
                LayerPlan(layer.name, int(counts[layer.name]), layer.n_weights, layer.shape) for layer in self.layers
            ],
            budget=budget,
            allocator=allocator,
            repair=str(pipe),
            budget_unit=cfg.unit,
            mask_rule=pipe.mask_rule,
            pattern=cfg.pattern,
            achieved_sparsity=self.achieved(counts) if cfg.unit == "flops" else None,
            source=exp.source(),
            calibration={
                "size": self.splits.calib.n,
                "selection_size": self.splits.selection.n,
                "validation_size": self.splits.validation.n if self.splits.validation else 0,
                **({"distill_size": self.splits.distill.n} if self.splits.distill is not None else {}),
                "seed": cfg.seed,
            },
            search=dict(self.search_info.get(float(budget), {})) if allocator == "optuna" else {},
            profile={
                "grid": [float(g) for g in exp.grid],
                "s_max": cfg.s_max,
                "lambda": cfg.lam,
                "layer_weights": cfg.layer_weights,
                **{k: v for k, v in prof.items() if k in ("profile_repair", "n_images")},
            },
            verify=verify or {},
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
