"""Repair step kinds: a registry of small classes, each parsing its text form and applying itself.

A kind registers under the method names its text form starts with (``bn``;
``lsq``, ``obs``; ``lw``, ``naive``, ``asr``). ``parse_step`` hands one
``>``-separated part of ``--repair`` to the kind its method names, and
``kind_of`` finds the kind of a parsed step to apply it with a ``StepContext``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import UserError

if TYPE_CHECKING:
    from .site_cache import DenseSiteCache

__all__ = ["RepairReport", "StepContext", "StepKind", "STEP_KINDS", "register", "parse_step", "kind_of", "step_kinds"]


@dataclass
class RepairReport:
    pipeline: str
    corrections: list[dict[str, str]] = field(default_factory=list)
    calib_passes: float = 0
    masks: dict[str, torch.Tensor] | None = None  # final keep-masks when a step chose them (obs)
    reconstructed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why reconstruction skipped it
    swept: list[str] = field(default_factory=list)  # layers re-fitted by the sweep, not the exact solve
    path: str = ""  # how a reconstruction reached its layers: lockstep, or per-layer passes (and why)
    distill: dict[str, Any] = field(default_factory=dict)  # the kd step's settings, images and losses

    def plan_fields(self) -> dict[str, Any]:
        """What a plan's ``verify`` block records of this repair: layers left, swept, the path, distillation."""
        fields = {
            "repair_left": dict(self.skipped),
            "repair_swept": list(self.swept),
            "repair_path": self.path,
            "repair_distill": dict(self.distill),
        }
        return {k: v for k, v in fields.items() if v}

    @property
    def affine_sites(self) -> list[str]:
        return sorted({c["site"] for c in self.corrections if c["placement"] == "affine"})


@dataclass
class StepContext:
    """What a step needs besides the pruned model; steps update ``cache``, ``masks`` and ``report``."""

    batches: Any
    report: RepairReport
    dense: nn.Module | None = None
    device: torch.device | str = "cpu"
    cache: DenseSiteCache | None = None  # built by the first channel step that needs it, shared by later ones
    masks: dict[str, torch.Tensor] | None = None  # keep-masks; a step that chooses masks replaces them
    nm: tuple[int, int] | None = None  # the N:M pattern the masks follow
    staged: bool = True  # node-by-node propagation where the model traces (propagate.py)
    max_cache_bytes: float = 4e9  # cap on the activations a step caches (run_repair: activation_cap)
    optional_sites: bool = False  # a channel step whose sites the model lacks is skipped, not refused
    progress: bool = False  # long steps (the reconstruction) show a bar with the time left
    seed: int = 0  # seeds a step's own randomness (kd's image draws and augmentation)
    distill_batches: Any = None  # images the kd step fits on (default: ``batches``)

    def dense_sites(self) -> DenseSiteCache:
        """The dense model's site statistics: the cache given to the pipeline, else one built on first use and
        shared by every later step."""
        if self.cache is None:
            from .site_cache import DenseSiteCache  # built lazily: most pipelines are given the session's

            if self.dense is None:
                raise ValueError("a channel-wise step needs the dense model or a DenseSiteCache")
            self.cache = DenseSiteCache(self.dense, self.batches, self.device)
        return self.cache


class StepKind:
    """One kind of step: the names it registers under, its text form and how it repairs a model."""

    methods: ClassVar[tuple[str, ...]] = ()
    usage: ClassVar[str] = ""  # how the unknown-step message lists this kind
    usage_rank: ClassVar[int] = 0  # its place in that message
    grammar: ClassVar[str] = ""  # its whole text form, as ``list`` shows it
    rewrites_weights: ClassVar[bool] = False  # re-pruning by magnitude alone would lose what it did

    def owns(self, step: Any) -> bool:
        """Whether ``step`` (a parsed step dataclass) is of this kind."""
        raise NotImplementedError

    def parse(self, part: str, text: str) -> Any | None:
        """The frozen step of ``part`` (one step of ``text``), or ``None`` when ``part`` is not of this kind."""
        raise NotImplementedError

    def apply(self, step: Any, pruned: nn.Module, ctx: StepContext) -> None:
        """Repair ``pruned`` in place with ``step``, recording what it did in ``ctx.report``."""
        raise NotImplementedError

    def chooses_masks(self, step: Any) -> bool:
        """Whether ``step`` chooses the keep-masks itself (instead of the layer-local magnitude rule)."""
        return False


def first_repeat(keys: Sequence[str]) -> str | None:
    """The first option key given twice in one step (the last value would silently win), or ``None``."""
    return next((k for i, k in enumerate(keys) if k in keys[:i]), None)


STEP_KINDS: dict[str, StepKind] = {}  # method name -> its kind


def register(cls: type[StepKind]) -> type[StepKind]:
    """Class decorator: register one instance of ``cls`` under each of its method names."""
    kind = cls()
    for m in cls.methods:
        if m in STEP_KINDS:
            raise ValueError(f"repair step method {m!r} is registered twice")
        STEP_KINDS[m] = kind
    return cls


def step_kinds() -> list[StepKind]:
    """The registered kinds, each once, in the order the unknown-step message lists them."""
    return sorted({id(k): k for k in STEP_KINDS.values()}.values(), key=lambda k: k.usage_rank)


def parse_step(part: str, text: str) -> Any:
    """Parse one step ``part`` of ``--repair text``; one-line ``UserError`` when no kind takes it."""
    kind = STEP_KINDS.get(part.split(":")[0].partition("@")[0])
    step = kind.parse(part, text) if kind is not None else None
    if step is None:
        usages = [k.usage for k in step_kinds()]
        listed = f"{', '.join(usages[:-1])} or {usages[-1]}" if len(usages) > 1 else "".join(usages)
        raise UserError(
            f"unknown repair step {part!r} in --repair {text!r}: use {listed} (e.g. lsq>bn>naive@block+logits)"
        )
    return step


def kind_of(step: Any) -> StepKind:
    """The kind that applies ``step``."""
    for kind in step_kinds():
        if kind.owns(step):
            return kind
    raise ValueError(f"no registered repair step kind applies {step!r}")
