"""The ``lsq``/``obs`` repair step kind: its text form and how it runs ``reconstruct`` in a pipeline."""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from ..nn.layers import reconstructed_layers
from .reconstruct import RECONSTRUCT_METHODS, SOLVES, ReconstructStep, reconstruct
from .refit import DEFAULT_OBS_BLOCK
from .steps import StepContext, StepKind, first_repeat, register

__all__ = ["Reconstruction"]


def _parse_options(method: str, opts: list[str], part: str, text: str) -> ReconstructStep:
    damp: float | None = None  # auto
    block, solve = DEFAULT_OBS_BLOCK, "auto"
    twice = first_repeat([o.partition("=")[0] for o in opts])
    if twice:
        raise UserError(f"option {twice!r} is given twice in repair step {part!r} (in --repair {text!r}): keep one")
    for o in opts:
        key, _, val = o.partition("=")
        try:
            if key == "damp" and val == "auto":
                damp = None
            elif key == "damp":
                damp = float(val)
                if not damp >= 0 or damp == float("inf"):
                    raise ValueError
            elif key == "block" and method == "obs":
                block = int(val)
                if block < 1:
                    raise ValueError
            elif key == "solve" and val in SOLVES:
                solve = val
            else:
                allowed = "damp=X|auto" + (", block=B" if method == "obs" else "") + f" or solve={'|'.join(SOLVES)}"
                raise UserError(
                    f"unknown option {o!r} in repair step {part!r}: use {allowed} (e.g. {method}:damp=0.01)"
                )
        except ValueError:
            raise UserError(
                f"bad value in {o!r} of repair step {part!r} (in --repair {text!r}): damp is a "
                "number >= 0 or auto, block a positive integer"
            )
    return ReconstructStep(method, damp, block, solve)


@register
class Reconstruction(StepKind):
    """``lsq``/``obs``: re-fit the kept weights of every Conv2d/Linear layer against the dense model."""

    methods = RECONSTRUCT_METHODS
    usage = ", ".join(RECONSTRUCT_METHODS)
    usage_rank = 1
    grammar = f"lsq[:damp=X|auto][:solve={'|'.join(SOLVES)}], obs[:damp=X|auto][:block=B][:solve={'|'.join(SOLVES)}]"
    rewrites_weights = True

    def owns(self, step) -> bool:
        return isinstance(step, ReconstructStep)

    def chooses_masks(self, step: ReconstructStep) -> bool:
        return step.method == "obs"

    def parse(self, part: str, text: str) -> ReconstructStep | None:
        head, *opts = part.split(":")
        return _parse_options(head, opts, part, text) if head in RECONSTRUCT_METHODS else None

    def apply(self, step: ReconstructStep, pruned: nn.Module, ctx: StepContext) -> None:
        ref = ctx.dense  # run_repair sets it from the cache when only that was given
        if ref is None:
            raise ValueError("reconstruction repair needs the dense model or a DenseSiteCache")
        layers = reconstructed_layers(pruned)
        rec = reconstruct(
            pruned,
            ref,
            ctx.batches,
            layers,
            step,
            masks=ctx.masks,
            nm=ctx.nm,
            device=ctx.device,
            staged=ctx.staged,
            max_cache_bytes=ctx.max_cache_bytes,
            progress=ctx.progress,
        )
        ctx.masks = {n: rec.masks[n] for n in (ctx.masks or rec.masks)}
        report = ctx.report
        report.masks = ctx.masks
        report.reconstructed = rec.fitted
        report.swept = [n for n in rec.fitted if step.sweeps(pruned.get_submodule(n))]
        report.skipped.update(rec.skipped)
        report.path = rec.path
        report.calib_passes += rec.passes
