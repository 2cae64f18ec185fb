"""Training-free repair: BN recalibration, channel-wise corrections (LW, naive, ASR), re-fits (lsq, obs), kd.

Modules: ``pipeline`` (text form, ``run_repair``), ``steps`` (the registry of
step kinds), ``channel`` (the ``bn`` and channel-wise kinds), ``reconstruct``
(the ``lsq``/``obs`` kind), ``distill`` (the ``kd`` kind), ``refit`` (its arithmetic), ``propagate`` (tracing
and the passes over the calibration set), ``sites``, ``affine``, ``bn``,
``persist``.
"""

from .affine import ChannelAffine, affine_modules, attach_output_affine, fold_correction
from .bn import recalibrate_bn
from .distill import DistillStep, distill
from .pipeline import (
    CHANNEL_METHODS,
    DenseSiteCache,
    RepairPipeline,
    RepairReport,
    RepairStep,
    run_repair,
    site_moments,
)
from .reconstruct import RECONSTRUCT_METHODS, ReconstructStep, reconstruct
from .sites import SITE_KINDS, Site, discover_sites, forward_order

# Named pipelines the CLI lists; any text form is accepted too.
PRESETS: dict[str, str] = {
    "none": "no repair",
    "bn": "BatchNorm recalibration only (REFLOW / EagleEye 'adaptive BN')",
    "asr@conv>bn": "ASR at conv outputs, then BN recalibration (the ASR paper's order)",
    "bn>asr@block+logits": "BN recalibration, then ASR at residual-block outputs and logits",
    "bn>lw@block+logits": "BN recalibration, then layer-wise scaling at block outputs and logits",
    "bn>naive@block+logits": "BN recalibration, then channel-wise without shrinkage (the best channel-wise "
    "pipeline on the selection split in studies/repair_ablation.py; no re-fit: the fastest)",
    "lsq>bn>naive@block+logits": "least-squares re-fit of the kept weights (magnitude masks), then the "
    "channel-wise default (options lsq:damp=0.01)",
    "obs>bn>naive@block+logits>kd": "the reconstruction pipeline, then distillation of the kept weights to the "
    "dense model on unlabeled images (kd: KL to the dense logits and per-block error, masks fixed; --distill-size "
    "draws more images)",
    "obs>bn>naive@block+logits": "the default: OBS-chosen masks (SparseGPT sweep, same per-layer counts) and "
    "least-squares re-fit, then the channel-wise pipeline: best on the selection split of "
    "studies/repair_ablation.py --reconstruct",
    "obs>naive@block+logits": "the default without bn, chosen when BatchNorm recalibration on the calibration "
    "images moves the dense model itself (off-distribution calibration images)",
}
# The default is the best measured pipeline that runs at any size: OBS masks and a least-squares re-fit, then
# the best channel-wise pipeline (studies/repair_ablation.py --reconstruct: +20 points at 0.9 on CIFAR ResNets
# over the channel-wise one, the stage-1 winner of studies/repair_ablation.py). Above an exact budget the OBS
# re-fit sweeps (sweep.py), so it runs on ImageNet-sized layers too. The channel-wise pipeline stays one flag
# away (--repair bn>naive@block+logits). When BatchNorm recalibration on the calibration images moves the
# dense model itself, the default leaves bn out (DEFAULT_WITHOUT_BN; bn.calibration_check).
CHANNEL_REPAIR = "bn>naive@block+logits"
RECONSTRUCT_REPAIR = "obs>" + CHANNEL_REPAIR
DEFAULT_REPAIR = RECONSTRUCT_REPAIR
DEFAULT_WITHOUT_BN = "obs>naive@block+logits"

__all__ = [
    "ChannelAffine",
    "affine_modules",
    "attach_output_affine",
    "fold_correction",
    "recalibrate_bn",
    "DistillStep",
    "distill",
    "CHANNEL_METHODS",
    "DenseSiteCache",
    "RepairPipeline",
    "RepairReport",
    "RepairStep",
    "run_repair",
    "site_moments",
    "RECONSTRUCT_METHODS",
    "ReconstructStep",
    "reconstruct",
    "SITE_KINDS",
    "Site",
    "discover_sites",
    "forward_order",
    "PRESETS",
    "DEFAULT_REPAIR",
    "DEFAULT_WITHOUT_BN",
    "CHANNEL_REPAIR",
    "RECONSTRUCT_REPAIR",
]
