"""Repair pipelines: a sequence of steps, each BN recalibration or a channel-wise repair at sites.

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
``lw``, ``naive``, ``asr`` and SITE in ``conv``, ``bn``, ``block``, ``logits``.
Corrections are computed sequentially in forward order: each site's pruned
statistics are measured after all upstream corrections. A reconstruction step
is ``lsq[:damp=X]`` or ``obs[:damp=X][:block=B]`` (``reconstruct.py``): it
rewrites the kept weights (``obs`` also chooses which weights are kept) of
every Conv2d/Linear layer and adds no module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import UserError
from ..hooks import forward_hooks
from ..stats import LAMBDA_RULES, ChannelMoments, as_bcx, repair_gamma
from .affine import fold_correction
from .bn import recalibrate_bn
from .reconstruct import DEFAULT_DAMP, DEFAULT_OBS_BLOCK, RECONSTRUCT_METHODS, ReconstructStep, reconstruct
from .sites import SITE_KINDS, Site, discover_sites, forward_order, missing_note
from .staged import CacheTooLarge, StagedRunner

__all__ = ["RepairStep", "RepairPipeline", "RepairReport", "DenseSiteCache", "run_repair", "CHANNEL_METHODS",
           "site_moments"]

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


@dataclass(frozen=True)
class RepairPipeline:
    steps: tuple[RepairStep | ReconstructStep, ...] = ()

    def __str__(self) -> str:
        return ">".join(str(s) for s in self.steps) or "none"

    @property
    def mask_rule(self) -> str:
        """``obs`` when a step chooses the masks itself, else ``magnitude`` (layer-local, by |w|)."""
        return "obs" if any(isinstance(s, ReconstructStep) and s.method == "obs" for s in self.steps) \
            else "magnitude"

    @property
    def reconstructs(self) -> bool:
        """Whether a step rewrites the kept weights (so re-pruning by magnitude alone loses quality)."""
        return any(isinstance(s, ReconstructStep) for s in self.steps)

    @classmethod
    def parse(cls, text: str) -> "RepairPipeline":
        """Parse the text form (see module docstring); one-line ``UserError`` on bad input."""
        text = (text or "").strip()
        if text in ("", "none"):
            return cls(())
        steps = []
        for part in text.split(">"):
            part = part.strip()
            if part == "bn":
                steps.append(RepairStep("bn"))
                continue
            head, *opts = part.split(":")
            if head in RECONSTRUCT_METHODS:
                steps.append(_parse_reconstruct(head, opts, part, text))
                continue
            method, _, sites_s = head.partition("@")
            if method not in CHANNEL_METHODS:
                raise UserError(f"unknown repair step {part!r} in --repair {text!r}: use bn, lsq, obs or "
                                f"METHOD@SITES with METHOD in {', '.join(CHANNEL_METHODS)} "
                                "(e.g. lsq>bn>naive@block+logits)")
            sites = tuple(s for s in sites_s.split("+") if s)
            if not sites or any(s not in SITE_KINDS for s in sites):
                raise UserError(f"repair step {part!r} needs sites from {', '.join(SITE_KINDS)} "
                                f"after '@' (e.g. {method}@block+logits)")
            shift, lam = True, "mean"
            for o in opts:
                if o == "noshift":
                    shift = False
                elif o == "shift":
                    shift = True
                elif o.startswith("lam="):
                    v = o[4:]
                    try:
                        lam = float(v)
                    except ValueError:
                        if v not in LAMBDA_RULES:
                            raise UserError(f"unknown lambda rule {v!r}: use {', '.join(LAMBDA_RULES)} or a number")
                        lam = v
                else:
                    raise UserError(f"unknown repair option {o!r} in {part!r}: use noshift or lam=RULE")
            steps.append(RepairStep(method, sites, shift, lam))
        return cls(tuple(steps))


def _parse_reconstruct(method: str, opts: list[str], part: str, text: str) -> ReconstructStep:
    damp, block = DEFAULT_DAMP, DEFAULT_OBS_BLOCK
    for o in opts:
        key, _, val = o.partition("=")
        try:
            if key == "damp":
                damp = float(val)
                if not damp >= 0 or damp == float("inf"):
                    raise ValueError
            elif key == "block" and method == "obs":
                block = int(val)
                if block < 1:
                    raise ValueError
            else:
                allowed = "damp=X" + (" or block=B" if method == "obs" else "")
                raise UserError(f"unknown option {o!r} in repair step {part!r}: use {allowed} "
                                f"(e.g. {method}:damp=0.01)")
        except ValueError:
            raise UserError(f"bad value in {o!r} of repair step {part!r} (in --repair {text!r}): damp is a "
                            "number >= 0, block a positive integer")
    return ReconstructStep(method, damp, block)


@dataclass
class RepairReport:
    pipeline: str
    corrections: list[dict[str, str]] = field(default_factory=list)
    calib_passes: float = 0
    masks: dict[str, torch.Tensor] | None = None  # final keep-masks when a step chose them (obs)
    reconstructed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why reconstruction skipped it

    @property
    def affine_sites(self) -> list[str]:
        return sorted({c["site"] for c in self.corrections if c["placement"] == "affine"})


class _Stop(Exception):
    """Raised by a hook once the site of interest has been seen: ends that forward early."""


def site_moments(model: nn.Module, sites: list[Site], batches: Iterable[tuple[torch.Tensor, Any]],
                 device: torch.device | str = "cpu", stop_after: str | None = None) -> dict[str, ChannelMoments]:
    """Per-channel moments of each site's output over ``batches`` (hooks removed on exit).

    With ``stop_after``, each forward ends as soon as that site's output is seen.
    """
    acc = {s.name: ChannelMoments() for s in sites}
    dims = {s.name: s.channel_dim for s in sites}

    def make(name: str):
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            acc[name].add_batch(as_bcx(out.float(), dims[name]))
            if name == stop_after:
                raise _Stop
        return hook

    with forward_hooks(model, {s.name: make(s.name) for s in sites}), torch.no_grad():
        for x, _ in batches:
            try:
                model(x.to(device))
            except _Stop:
                pass
    return acc


class DenseSiteCache:
    """Dense-model site statistics and forward order, computed once per calibration set.

    The dense model never changes, so every plan verified against it (each
    Optuna trial, each allocator of a comparison) reuses one dense pass.
    """

    def __init__(self, dense: nn.Module, batches, device: torch.device | str = "cpu") -> None:
        self.dense, self.batches, self.device = dense, batches, device
        self._sites: dict[tuple[str, ...], list[Site]] = {}
        self._moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.notes: list[str] = []  # one line per step whose site kinds the model partly lacks

    def sites(self, kinds: tuple[str, ...]) -> list[Site]:
        """Sites of ``kinds`` in forward order; kinds the model lacks are skipped, said once in one line."""
        if kinds not in self._sites:
            x0 = next(iter(self.batches))[0][:2].to(self.device)
            missing: list[str] = []
            found = discover_sites(self.dense, kinds, example=x0, missing=missing)
            if missing:
                self.notes.append(missing_note(kinds, missing))
                print(f"note: {self.notes[-1]}", flush=True)
            self._sites[kinds] = forward_order(self.dense, found, x0)
        return self._sites[kinds]

    def moments(self, sites: list[Site]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        todo = [s for s in sites if s.name not in self._moments]
        if todo:
            for name, m in site_moments(self.dense, todo, self.batches, self.device).items():
                self._moments[name] = (m.mean, m.var)
        return {s.name: self._moments[s.name] for s in sites}


def run_repair(pruned: nn.Module, pipeline: RepairPipeline | str, batches,
               dense: nn.Module | None = None, device: torch.device | str = "cpu",
               cache: DenseSiteCache | None = None, staged: bool = True,
               max_cache_bytes: float = 4e9, masks: dict[str, torch.Tensor] | None = None,
               nm: tuple[int, int] | None = None) -> RepairReport:
    """Repair ``pruned`` in place with ``pipeline`` on calibration ``batches``.

    Channel steps need the dense model (or a ``DenseSiteCache`` built on it) for
    the target statistics. With ``staged`` (default) a channel step runs as one
    pass over the calibration set (see ``staged.py``); models that ``torch.fx``
    cannot trace, or whose cached activations would exceed ``max_cache_bytes``,
    fall back to one partial forward per site. Reconstruction steps (``lsq``,
    ``obs``) re-fit every Conv2d/Linear layer against the dense model; ``masks``
    (keep-masks, default: the non-zero weights) and ``nm`` (the N:M pattern
    they follow) tell them what is pruned. Returns where each correction was
    placed, how many calibration passes were spent, and the final masks.
    """
    if isinstance(pipeline, str):
        pipeline = RepairPipeline.parse(pipeline)
    report = RepairReport(str(pipeline))
    for step in pipeline.steps:
        if isinstance(step, ReconstructStep):
            ref = dense if dense is not None else (cache.dense if cache is not None else None)
            if ref is None:
                raise ValueError("reconstruction repair needs the dense model or a DenseSiteCache")
            layers = [n for n, m in pruned.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            rec = reconstruct(pruned, ref, batches, layers, step, masks=masks, nm=nm, device=device,
                              staged=staged)
            masks = {n: rec.masks[n] for n in (masks or rec.masks)}
            report.masks = masks
            report.reconstructed = rec.fitted
            report.skipped.update(rec.skipped)
            report.calib_passes += rec.passes
            continue
        if step.method == "bn":
            recalibrate_bn(pruned, batches, device)
            report.calib_passes += 1
            continue
        if cache is None:
            if dense is None:
                raise ValueError("channel-wise repair needs the dense model or a DenseSiteCache")
            cache = DenseSiteCache(dense, batches, device)
        sites = cache.sites(tuple(step.sites))
        targets = cache.moments(sites)

        def correct(site: Site, m: ChannelMoments, step: RepairStep = step) -> tuple[torch.Tensor, torch.Tensor]:
            mu_p, v_p = m.mean, m.var
            mu_d, v_d = targets[site.name]
            gamma = repair_gamma(v_d, v_p, step.method, step.lam)
            shift = (mu_d if step.mean_shift else mu_p) - gamma * mu_p
            placement = fold_correction(pruned, site.name, site.kind, gamma.float(), shift.float(),
                                        site.consumer_bn, site.channel_dim)
            report.corrections.append({"site": site.name, "kind": site.kind, "placement": placement,
                                       "step": str(step)})
            if placement == "folded-into-next-bn":  # the site's own output carries only the scale
                return gamma.float(), torch.zeros_like(shift).float()
            return gamma.float(), shift.float()

        n_before = len(report.corrections)
        if staged:
            try:
                runner = StagedRunner(pruned, sites, max_cache_bytes)
            except Exception:  # torch.fx cannot trace this model: recompute per site below
                runner = None
            if runner is not None:
                try:
                    runner.run(batches, sites, device, correct)
                    report.calib_passes += 1
                    continue
                except CacheTooLarge:
                    report.calib_passes += 1  # the sites corrected so far stay; the rest recompute
        done = len(report.corrections) - n_before
        # one partial forward per site, each ending right after its site
        for site in sites[done:]:
            m = site_moments(pruned, [site], batches, device, stop_after=site.name)[site.name]
            correct(site, m)
            report.calib_passes += 1
    return report
