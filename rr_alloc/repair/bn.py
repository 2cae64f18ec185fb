"""BatchNorm recalibration ("BN only", as in REPAIR / airbench), with exact statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..nn.stats import ChannelMoments
from .propagate import CacheTooLarge, StagedRunner, input_moments
from .sites import Site, forward_order

__all__ = [
    "recalibrate_bn",
    "batchnorms",
    "BATCHNORMS",
    "CalibrationCheck",
    "calibration_check",
    "CALIBRATION_MIN_AGREEMENT",
]

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    """The BatchNorms that keep running statistics, by dotted name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BATCHNORMS) and m.track_running_stats}


def _set_statistics(bn: Any, mom: ChannelMoments) -> None:
    """Running mean and unbiased variance (torch's convention for running_var) of all the images' inputs."""
    n = mom.n
    bn.running_mean.copy_(mom.mean.to(bn.running_mean))
    bn.running_var.copy_((mom.var * (n / max(n - 1, 1))).to(bn.running_var))


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, batches: Any, device: torch.device | str = "cpu", max_cache_bytes: float = 4e9
) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches``, exactly.

    In forward order, each BatchNorm gets the mean and unbiased variance of its input over all the images, with
    the model in eval mode and every BatchNorm before it already recalibrated: the pruned model's own statistics,
    the same for any batch size or order (train-mode estimates would normalise upstream layers by each batch's
    statistics, and average per-batch variances). One node-by-node pass where the model traces
    (``propagate.StagedRunner``), else one partial forward per BatchNorm. Idempotent. Returns how many were updated.
    """
    bns = batchnorms(model)
    if not bns:
        return 0
    was = model.training
    model.eval()
    sites = [Site(name, "bn", 1) for name in bns]
    done: set[str] = set()

    def update(site: Site, mom: ChannelMoments) -> None:
        _set_statistics(bns[site.name], mom)
        done.add(site.name)

    try:
        runner, _ = StagedRunner.build(model, sites, max_cache_bytes)
        if runner is not None:
            try:
                runner.run_inputs(batches, sites, device, update)
            except CacheTooLarge:
                pass  # the BatchNorms updated so far stay; the rest take partial forwards
        todo = [s for s in sites if s.name not in done]
        if todo:
            x0 = next(iter(batches))[0][:2].to(device)
            for site in forward_order(model, todo, x0):
                update(site, input_moments(model, site, batches, device))
    finally:
        model.train(was)
    return len(bns)


# Below this top-1 agreement of the BN-recalibrated dense model with the dense one (selection split), the
# calibration images are taken to be off the model's distribution: the default pipeline then leaves bn out.
# Measured in studies/calibration_check.py (where bn helps the pruned model and where it hurts).
CALIBRATION_MIN_AGREEMENT = 0.95


@dataclass(frozen=True)
class CalibrationCheck:
    """BatchNorm recalibration on the calibration images alone, applied to the *dense* model and compared with
    it on held-out images: matched images leave it near itself, off-distribution images (another dataset,
    another resolution) move it, and ``bn`` would then repair towards the wrong statistics."""

    agreement: float
    kl: float
    n: int
    min_agreement: float = CALIBRATION_MIN_AGREEMENT

    @property
    def moves(self) -> bool:
        return self.agreement < self.min_agreement

    def to_dict(self) -> dict[str, Any]:
        out = {"agreement": self.agreement, "kl": self.kl, "n": self.n, "min_agreement": self.min_agreement}
        return {**out, "moves": self.moves}


@torch.no_grad()
def calibration_check(
    dense: nn.Module, calib: Any, held_out: Any, device: torch.device | str = "cpu"
) -> CalibrationCheck:
    """Recalibrate a copy of ``dense`` on ``calib`` and compare it with ``dense`` on ``held_out`` (top-1
    agreement, mean KL of the copy to the dense model)."""
    import copy

    from ..nn.metrics import logits_of, per_image

    model = copy.deepcopy(dense)
    recalibrate_bn(model, calib, device)
    ref, _ = logits_of(dense, held_out, device)
    got, _ = logits_of(model, held_out, device)
    agree, kl = per_image(got, ref)
    return CalibrationCheck(float(agree.mean()), float(kl.mean()), len(ref))
