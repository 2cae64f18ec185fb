"""Repair pipelines: a sequence of steps, each of a registered kind (``steps.py``).

Text form (used by ``--repair`` and stored in plans), steps joined by ``>`` in
the order they run::

    none                      no repair
    bn                        BatchNorm recalibration only
    asr@conv>bn               ASR at conv outputs, then BN recalibration (the papers' order)
    bn>asr@block+logits       BN recalibration, then ASR at residual-block outputs and logits
    bn>naive@block:noshift    channel-wise without shrinkage, no mean shift
    bn>asr@block:lam=median   ASR with lambda = median of v_p

    lsq>bn>naive@block+logits least-squares re-fit of the kept weights, then the default
    obs:damp=0.1>bn           OBS-chosen masks (same per-layer counts) and re-fit, then BN

A channel step is ``METHOD@SITE[+SITE...][:noshift][:lam=RULE]`` with METHOD in
``lw``, ``naive``, ``asr`` and SITE in ``conv``, ``bn``, ``block``, ``logits``
(``channel.py``). Corrections are computed sequentially in forward order: each
site's pruned statistics are measured after all upstream corrections. A
reconstruction step is ``lsq[:damp=X]`` or ``obs[:damp=X][:block=B]``
(``reconstruct.py``): it rewrites the kept weights (``obs`` also chooses which
weights are kept) of every Conv2d/Linear layer and adds no module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .channel import CHANNEL_METHODS, RepairStep
from .distill import Distillation, DistillStep  # noqa: F401  (registers the kd kind)
from .propagate import activation_cap, site_moments
from .reconstruct import ReconstructStep
from .reconstruct_kind import Reconstruction  # noqa: F401  (registers the lsq/obs kind)
from .site_cache import DenseSiteCache
from .steps import RepairReport, StepContext, kind_of, parse_step

__all__ = [
    "RepairStep",
    "RepairPipeline",
    "RepairReport",
    "DenseSiteCache",
    "run_repair",
    "CHANNEL_METHODS",
    "site_moments",
]


@dataclass(frozen=True)
class RepairPipeline:
    steps: tuple[RepairStep | ReconstructStep | DistillStep, ...] = ()

    def __str__(self) -> str:
        return ">".join(str(s) for s in self.steps) or "none"

    @property
    def mask_rule(self) -> str:
        """``obs`` when a step chooses the masks itself, else ``magnitude`` (layer-local, by |w|)."""
        return "obs" if any(kind_of(s).chooses_masks(s) for s in self.steps) else "magnitude"

    @property
    def reconstructs(self) -> bool:
        """Whether a step rewrites the kept weights (so re-pruning by magnitude alone loses quality)."""
        return any(kind_of(s).rewrites_weights for s in self.steps)

    @classmethod
    def parse(cls, text: str, flag: str = "--repair") -> "RepairPipeline":
        """Parse the text form (see module docstring); one-line ``UserError`` on bad input, naming ``flag``."""
        text = (text or "").strip()
        if text in ("", "none"):
            return cls(())
        try:
            return cls(tuple(parse_step(part.strip(), text) for part in text.split(">")))
        except UserError as e:
            if flag == "--repair":
                raise
            raise UserError(str(e).replace("--repair", flag)) from None


def run_repair(
    pruned: nn.Module,
    pipeline: RepairPipeline | str,
    batches,
    dense: nn.Module | None = None,
    device: torch.device | str = "cpu",
    cache: DenseSiteCache | None = None,
    staged: bool = True,
    max_cache_bytes: float | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    nm: tuple[int, int] | None = None,
    optional_sites: bool = False,
    progress: bool = False,
    seed: int = 0,
    distill_batches=None,
) -> RepairReport:
    """Repair ``pruned`` in place with ``pipeline`` on calibration ``batches``.

    Channel steps need the dense model (or a ``DenseSiteCache`` built on it) for
    the target statistics. With ``staged`` (default) a channel step runs as one
    pass over the calibration set (see ``propagate.py``); models that ``torch.fx``
    cannot trace, or whose cached activations would exceed ``max_cache_bytes``
    (default ``activation_cap(device)``: a share of the memory free now),
    fall back to one partial forward per site. Reconstruction steps (``lsq``,
    ``obs``) re-fit every Conv2d/Linear layer against the dense model; ``masks``
    (keep-masks, default: the non-zero weights) and ``nm`` (the N:M pattern
    they follow) tell them what is pruned. ``optional_sites``: a channel step whose sites the model lacks
    is skipped with a note instead of refused (for the default pipeline, whose sites nobody chose).
    ``seed`` seeds a step's own randomness and ``distill_batches`` are the images the ``kd`` step fits on
    (default: ``batches``). Returns where each correction was placed, how many calibration passes were spent,
    and the final masks.
    """
    if isinstance(pipeline, str):
        pipeline = RepairPipeline.parse(pipeline)
    ctx = StepContext(
        batches,
        RepairReport(str(pipeline)),
        dense=dense if dense is not None or cache is None else cache.dense,  # every step reads it from here
        device=device,
        cache=cache,
        masks=masks,
        nm=nm,
        staged=staged,
        max_cache_bytes=activation_cap(device) if max_cache_bytes is None else max_cache_bytes,
        optional_sites=optional_sites,
        progress=progress,
        seed=seed,
        distill_batches=distill_batches,
    )
    for step in pipeline.steps:
        kind_of(step).apply(step, pruned, ctx)
    return ctx.report
