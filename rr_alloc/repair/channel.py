"""Steps that act through per-channel statistics: BatchNorm recalibration and channel-wise repair at sites.

A channel step is ``METHOD@SITE[+SITE...][:noshift][:lam=RULE]`` with METHOD
in ``lw``, ``naive``, ``asr`` and SITE in ``conv``, ``bn``, ``block``,
``logits``. Corrections are computed sequentially in forward order: each
site's pruned statistics are measured after all upstream corrections, in one
node-by-node pass where the model traces (``propagate.StagedRunner``), else
one partial forward per site. The dense targets come from a
``site_cache.DenseSiteCache``, computed once per calibration set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..nn.stats import LAMBDA_RULES, ChannelMoments, repair_gamma
from .affine import fold_correction
from .bn import batchnorms, recalibrate_bn
from .propagate import CacheTooLarge, StagedRunner, site_moments
from .sites import SITE_KINDS, Site
from .steps import RepairReport, StepContext, StepKind, first_repeat, register

__all__ = ["RepairStep", "CHANNEL_METHODS", "BnRecalibration", "ChannelRepair"]

CHANNEL_METHODS = ("lw", "naive", "asr")


@dataclass(frozen=True)
class RepairStep:
    """One step: ``bn`` recalibration, or a channel-wise method at sites."""

    method: str
    sites: tuple[str, ...] = ()
    mean_shift: bool = True
    lam: str | float = "mean"

    def __str__(self) -> str:
        if self.method == "bn":
            return "bn"
        s = f"{self.method}@{'+'.join(self.sites)}"
        if not self.mean_shift:
            s += ":noshift"
        if self.method == "asr" and self.lam != "mean":
            s += f":lam={self.lam}"
        return s


@register
class BnRecalibration(StepKind):
    """``bn``: re-estimate every BatchNorm's running statistics (one calibration pass)."""

    methods = ("bn",)
    usage = "bn"
    usage_rank = 0
    grammar = "bn"

    def owns(self, step) -> bool:
        return isinstance(step, RepairStep) and step.method == "bn"

    def parse(self, part: str, text: str) -> RepairStep | None:
        return RepairStep("bn") if part == "bn" else None

    def apply(self, step: RepairStep, pruned: nn.Module, ctx: StepContext) -> None:
        if not batchnorms(pruned):  # nothing to recalibrate: a step that would do nothing is not run silently
            if not ctx.optional_sites:
                raise UserError(
                    "repair step 'bn' has nothing to act on: the model has no BatchNorm; drop bn from --repair"
                )
            note = "repair step bn skipped: the model has no BatchNorm"
            notes = ctx.cache.notes if ctx.cache is not None else []
            if note not in notes:
                notes.append(note)
                print(f"note: {note}", flush=True)
            return
        recalibrate_bn(pruned, ctx.batches, ctx.device, ctx.max_cache_bytes)
        ctx.report.calib_passes += 1


def _parse_options(opts: list[str], part: str, method: str) -> tuple[bool, str | float]:
    shift, lam = True, "mean"
    twice = first_repeat(["shift" if o in ("shift", "noshift") else o.partition("=")[0] for o in opts])
    if twice:
        raise UserError(f"repair step {part!r} sets {twice!r} twice ({', '.join(opts)}): keep one")
    for o in opts:
        if o == "noshift":
            shift = False
        elif o == "shift":
            shift = True
        elif o.startswith("lam="):
            if method != "asr":  # only ASR shrinks: a lambda elsewhere would be recorded and ignored
                raise UserError(f"{o!r} in repair step {part!r}: lam applies to asr only; drop it or use asr@...")
            v = o[4:]
            try:
                lam = float(v)
            except ValueError:
                if v not in LAMBDA_RULES:
                    raise UserError(f"unknown lambda rule {v!r}: use {', '.join(LAMBDA_RULES)} or a number")
                lam = v
            if isinstance(lam, float) and not 0 <= lam < float("inf"):  # refuses nan too
                raise UserError(f"lambda {v!r} in repair step {part!r} must be a finite number >= 0, mean or median")
        else:
            raise UserError(f"unknown repair option {o!r} in {part!r}: use noshift or lam=RULE")
    return shift, lam


class _SiteCorrection:
    """Folds one step's correction at a site from its pruned moments; counts the sites done."""

    def __init__(
        self,
        pruned: nn.Module,
        step: RepairStep,
        targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
        report: RepairReport,
    ) -> None:
        self.pruned, self.step, self.targets, self.report = pruned, step, targets, report
        self.count = 0

    def __call__(self, site: Site, m: ChannelMoments) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold the correction; return the scale and shift the site's own output now carries."""
        step = self.step
        mu_p, v_p = m.mean, m.var
        mu_d, v_d = self.targets[site.name]
        gamma = repair_gamma(v_d, v_p, step.method, step.lam)
        shift = (mu_d if step.mean_shift else mu_p) - gamma * mu_p
        placement = fold_correction(
            self.pruned, site.name, site.kind, gamma.float(), shift.float(), site.consumer_bn, site.channel_dim
        )
        self.report.corrections.append(
            {"site": site.name, "kind": site.kind, "placement": placement, "step": str(step)}
        )
        self.count += 1
        if placement == "folded-into-next-bn":  # the site's own output carries only the scale
            return gamma.float(), torch.zeros_like(shift).float()
        return gamma.float(), shift.float()


@register
class ChannelRepair(StepKind):
    """``lw``/``naive``/``asr`` at sites: per-channel scale and shift towards the dense statistics."""

    methods = CHANNEL_METHODS
    usage = f"METHOD@SITES with METHOD in {', '.join(CHANNEL_METHODS)}"
    usage_rank = 2
    grammar = (
        f"METHOD@SITE[+SITE...][:noshift][:lam=mean|median|X] (METHOD: {', '.join(CHANNEL_METHODS)}; "
        f"SITE: {', '.join(SITE_KINDS)})"
    )

    def owns(self, step) -> bool:
        return isinstance(step, RepairStep) and step.method != "bn"

    def parse(self, part: str, text: str) -> RepairStep | None:
        head, *opts = part.split(":")
        method, _, sites_s = head.partition("@")
        if method not in CHANNEL_METHODS:
            return None
        sites = tuple(sites_s.split("+"))
        if not sites_s or any(s not in SITE_KINDS for s in sites):
            raise UserError(
                f"repair step {part!r} needs sites from {', '.join(SITE_KINDS)} after '@' (e.g. {method}@block+logits)"
            )
        twice = first_repeat(list(sites))
        if twice:
            raise UserError(f"site {twice!r} is named twice in repair step {part!r} (in --repair {text!r}): keep one")
        return RepairStep(method, sites, *_parse_options(opts, part, method))

    def apply(self, step: RepairStep, pruned: nn.Module, ctx: StepContext) -> None:
        cache = ctx.dense_sites()
        sites = cache.sites(tuple(step.sites), optional=ctx.optional_sites)
        if not sites:
            return
        correct = _SiteCorrection(pruned, step, cache.moments(sites), ctx.report)
        if ctx.staged:
            runner, _ = StagedRunner.build(pruned, sites, ctx.max_cache_bytes)
            if runner is not None:
                try:
                    runner.run(ctx.batches, sites, ctx.device, correct)
                    ctx.report.calib_passes += 1
                    return
                except CacheTooLarge:
                    ctx.report.calib_passes += 1  # the sites corrected so far stay; the rest recompute
        # one partial forward per site, each ending right after its site
        for site in sites[correct.count :]:
            m = site_moments(pruned, [site], ctx.batches, ctx.device, stop_after=site.name)[site.name]
            correct(site, m)
            ctx.report.calib_passes += 1
