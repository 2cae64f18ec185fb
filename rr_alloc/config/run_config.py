"""Run configuration: one frozen dataclass whose fields declare every option once.

Each field's metadata (``option``: help, choices, flag group, check, whether it keys a search study) is the
single declaration from which the command-line flags (``cli/flags.py``), the YAML keys, validation and the
search study's settings key are generated. YAML keys are the long flag names with underscores
(``calib_size: 1024``); values may use environment variables (``${RR_ALLOC_SHARED}/weights/...``). Files are
read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, fields, replace
from typing import Any

from ..allocators import BUDGET_UNITS, allocator_class
from ..allocators.rr import LAYER_WEIGHTS
from ..data.splits import DataSpec
from ..data.transforms import TransformSpec
from ..errors import UserError
from ..nn.stats import LAMBDA_RULES
from ..profiling.rr import DEFAULT_GRID
from ..repair import DEFAULT_REPAIR, DistillStep, RepairPipeline
from ..search.level_db import INPUT_RULES
from ..search.level_space import level_rule
from ..search.objectives import OBJECTIVES
from ..search.optimizers import GUIDANCE, OPTIMIZERS
from .options import GROUPS, boolean, fractions, mapping, option, real, text, texts, whole

__all__ = ["RunConfig", "option_fields", "GROUPS"]


def lambda_rule(v: Any) -> str | None:
    """The RR profile's ASR shrinkage: ``mean``, ``median`` or a finite number >= 0."""
    if v in LAMBDA_RULES or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf")):
        return None
    return f"{' or '.join(LAMBDA_RULES)}, or a finite number >= 0"


@dataclass(frozen=True)
class RunConfig:
    # model
    model: str = option(
        "digits_resnet",
        text,
        "zoo name (see `list`), torchvision model, or package.module:factory (imports and runs that code)",
        "data",
    )
    checkpoint: str | None = option(None, text, "state_dict file, loaded with weights_only=True", "data")
    num_classes: int | None = option(
        None, whole(1, 1_000_000), "classifier outputs when building the model", "data", kind=int
    )
    pretrained: bool = option(False, boolean, "torchvision models: download the DEFAULT weights", "data", kind=bool)
    # data
    dataset: str = option("digits", text, "digits | imagefolder | cifar10 | cifar100 | mnist | fashionmnist", "data")
    train_data: str | None = option(None, text, "training images: ImageFolder directory or torchvision root", "data")
    test_data: str | None = option(None, text, "test images (reporting only): ImageFolder directory or root", "data")
    transform: dict[str, Any] | None = option(None, mapping)  # config files only: overrides the model's transform
    download: bool = option(False, boolean)  # config files only: torchvision datasets
    calib_size: int | None = option(
        None,
        whole(2),  # the RR profile's shrinkage and the channel-wise repair take variances over images
        "calibration images from the training data (default 1024; 512 for the 1,400-image digits pool)",
        "data",
        kind=int,
    )
    selection_size: int | None = option(
        None, whole(0), "held-out selection images, disjoint (default: as --calib-size)", "data", kind=int
    )
    eval_size: int | None = option(None, whole(1), "test images to report on (default: all)", "data", kind=int)
    batch_size: int = option(256, whole(1), "images per forward", "data", kind=int)
    seed: int = option(0, whole(0), "seed of the calibration/selection draw", "data", kind=int)
    # execution
    device: str = option("auto", text, "auto | cpu | cuda", "data")
    threads: int | None = option(None, whole(1, 4096), "torch CPU threads", "data", kind=int)
    cache: bool = option(
        True, boolean, "recompute the RR profile instead of reusing a cached one", "data", kind=bool, flag="--no-cache"
    )
    cache_dir: str | None = option(
        None, text, "cache directory (default $RR_ALLOC_CACHE, else ~/.cache/rr_alloc)", "data"
    )
    # profile
    grid: tuple[float, ...] = option(
        DEFAULT_GRID, fractions, "probe sparsities of the RR profile", "alloc", kind=float, many=True
    )
    s_max: float = option(
        0.99, real(0.0, 1.0), "per-layer sparsity cap; the grid must reach it", "alloc", kind=float, study_key="always"
    )
    include: tuple[str, ...] = option(
        (), texts, "layer-name patterns to allocate (default: all Conv2d/Linear)", "alloc", many=True
    )
    exclude: tuple[str, ...] = option((), texts, "layer-name patterns to leave dense", "alloc", many=True)
    lam: str | float = option("mean", lambda_rule)  # config files only: the ASR shrinkage rule of the RR profile
    # allocation
    allocator: str = option(
        "best-rule",
        text,
        "allocator (see `list`; default best-rule: every rule scored on the selection split under the repair, "
        "the best returned; global magnitude is the fastest)",
        "alloc",
    )
    reference: str | None = option(
        None, text, "allocator verified side by side (default global; rr-greedy when --allocator is global)", "alloc"
    )
    unit: str = option(
        "weights",
        text,
        "count the budget in weights or FLOPs (MACs)",
        "alloc",
        choices=BUDGET_UNITS,
        study_key="always",
    )
    layer_weights: str = option(
        "uniform",
        text,
        "per-layer weights of the RR objective",
        "alloc",
        choices=LAYER_WEIGHTS,
        study_key="always",
    )
    pattern: str | None = option(
        None,
        text,
        "N:M semi-structured pruning instead of a budget, e.g. 2:4 (keep 2 of "
        "every 4 input channels at one kernel position; layers whose inputs are not a "
        "multiple of M stay dense)",
        "alloc",
    )
    # repair / verification (bn>naive@block+logits: studies/repair_ablation.py, selection split)
    repair: str = option(
        DEFAULT_REPAIR,
        text,
        "repair pipeline for verification (default obs>bn>naive@block+logits, without bn when recalibration on the "
        "calibration images moves the dense model; bn>naive@block+logits is the fast channel-wise one)",
        "repair",
    )
    distill_size: int = option(
        0,
        whole(0),
        "images the kd repair step fits on: the calibration split plus further training images, disjoint from "
        "selection and validation (0: the calibration split alone)",
        "repair",
        kind=int,
    )
    profile_repair: str = option(
        "channel",
        text,
        "repair the RR profile measures: channel, lsq[:damp=X|auto] or obs[:damp=X|auto] "
        "(least-squares re-fit of the kept weights; the RR allocators then plan for it)",
        "alloc",
    )
    # search (--allocator optuna)
    n_trials: int = option(
        30,
        whole(0),
        "trials this process adds to the study (0: write the plan from the study's best trial)",
        "search",
        kind=int,
    )
    timeout: float | None = option(None, real(0.0), "stop the study after this many seconds", "search", kind=float)
    storage: str | None = option(
        None,
        text,
        "Optuna storage: sqlite:///FILE, postgresql+psycopg://USER@HOST/DB "
        "(several machines), or a journal file *.log (default: SQLite file beside the "
        "plan)",
        "search",
    )
    study_name: str | None = option(
        None,
        text,
        "Optuna study name (default: keyed on the model, image and "
        "settings fingerprints, so workers anywhere with the same inputs share it)",
        "search",
    )
    total_trials: int | None = option(
        None,
        whole(1),
        "stop every worker once the study holds this many evaluated trials (completed, or screened out by evo)",
        "search",
        kind=int,
    )
    heartbeat_interval: int = option(
        60, whole(1, 86400), "seconds between a running trial's heartbeats (database storages)", "search", kind=int
    )
    grace_period: int | None = option(
        None,
        whole(1, 10 * 86400),
        "seconds without a heartbeat after which a trial is failed and re-run (default twice the interval)",
        "search",
        kind=int,
    )
    max_retry: int = option(2, whole(0, 1000), "re-runs of a killed worker's trial", "search", kind=int)
    objective: str = option(
        "kl",
        text,
        "search (and best-rule) objective on the selection split (kl is label-free)",
        "search",
        choices=OBJECTIVES,
        study_key="always",
    )
    optimizer: str = option(
        "evo",
        text,
        "search of --allocator optuna: evo (block moves from global magnitude), "
        "cmaes (per-layer magnitude multipliers started at global magnitude) or tpe-mix "
        "(mixes of the baseline plans)",
        "search",
        choices=OPTIMIZERS,
        study_key="always",
    )
    guidance: str = option(
        "rr",
        text,
        "evo: draw moves by the RR profile's marginal repaired distortion (rr) or uniformly (none)",
        "search",
        choices=GUIDANCE,
        study_key="evo",
    )
    screen_size: int | None = option(
        None,
        whole(1),
        "evo: selection images a candidate is screened on before its "
        "full score (default a quarter of the selection split)",
        "search",
        kind=int,
        study_key="evo",
    )
    search_step: float = option(
        0.05,
        real(0.0, 1.0),
        "evo: a move shifts this fraction of the smaller layer's weights",
        "search",
        kind=float,
        study_key="evo",
    )
    search_repair: str | None = option(
        None,
        text,
        "repair that scores search candidates and best-rule's rules (default: --repair); "
        "e.g. the fast channel-wise bn>naive@block+logits while --repair obs>... "
        "verifies the plan",
        "search",
    )
    level_inputs: str = option(
        "auto",
        text,
        "evo under a reconstruction repair (lsq/obs first): score candidates stitched from a per-layer level "
        "database fitted on the anchor's sequential inputs (anchor), the dense inputs (dense) or the "
        "uniformly pruned model's (uniform); off: the same level moves, every candidate through the full sequential "
        "pipeline (no database); auto: anchor when "
        "the search repair reconstructs, else off",
        "search",
        choices=("auto", "off", *INPUT_RULES),
        study_key="evo",
    )
    ladder_step: float = option(
        0.1,
        real(0.0, 0.5),
        "level database: each level keeps 1 - STEP of the previous level's weights (a search move is one level)",
        "search",
        kind=float,
        study_key="evo",
    )
    stages: tuple[int, ...] = option(
        (),
        lambda v: None if all(isinstance(x, int) and x >= 1 for x in v) else "positive integers",
        "level search: selection images of each screening stage before the full score "
        "(default an eighth and a half of the split)",
        "search",
        kind=int,
        many=True,
        study_key="evo",
    )
    validation_size: int = option(
        0,
        whole(0),
        "training images held out from calibration and selection: a "
        "searched plan is kept only when it beats global magnitude there (0: no check)",
        "search",
        kind=int,
    )
    # output
    out: str | None = option(None, text)  # config files only: each command declares its own --out

    def data_spec(self, default_transform: TransformSpec | None) -> DataSpec:
        tf = TransformSpec.from_dict(self.transform) if self.transform else default_transform
        small = self.dataset == "digits"
        calib = self.calib_size if self.calib_size is not None else (512 if small else 1024)
        sel = self.selection_size if self.selection_size is not None else (512 if small else 1024)
        return DataSpec(
            kind=self.dataset,
            train=self.train_data,
            test=self.test_data,
            transform=tf,
            calib_size=calib,
            selection_size=sel,
            validation_size=self.validation_size,
            distill_size=self.distill_size,
            eval_size=self.eval_size,
            seed=self.seed,
            download=self.download,
        )

    @property
    def reference_allocator(self) -> str:
        """The allocator verified side by side with the plan (never the plan's own allocator by default)."""
        if self.reference:
            return self.reference
        return "global" if self.allocator != "global" else "rr-greedy"

    @property
    def loop_repair(self) -> str:
        """The repair that scores search candidates (``search_repair``, else the run's ``repair``)."""
        return self.search_repair or self.repair

    def validate(self) -> "RunConfig":
        """Check every field's type and range; a bad one is a one-line ``UserError`` naming the key.

        Values reach here from flags, config files and plans alike, so the check is in one place.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            problem = f.metadata["check"](value)
            if not problem and f.metadata["choices"] and value not in f.metadata["choices"]:
                problem = f"one of {', '.join(f.metadata['choices'])}"
            if problem:
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                if f.metadata["help"] is None:  # no flag: only a config file (or a plan) sets it
                    raise UserError(f"config key {f.name!r} must be {problem}, got {shown}: fix the config file")
                flag = f.metadata["flag"] or f"--{f.name.replace('_', '-')}"
                raise UserError(
                    f"{f.name} ({flag}) must be {problem}, got {shown}: fix the flag, the config file key or the "
                    "plan's value"
                )
        if self.dataset == "digits" and (self.train_data or self.test_data):
            raise UserError(
                "train_data/test_data (--train-data/--test-data) name image folders, but the dataset is the "
                "built-in digits: pass --dataset imagefolder (or cifar10, mnist, ...)"
            )
        if self.reference and allocator_class(self.reference).search_options is None:
            raise UserError(
                f"--reference {self.reference} is a search, not a rule to verify beside the plan: pass a rule "
                "(global, uniform, lamp, erk, rr-greedy, rr-exact, best-rule), or search with --allocator optuna"
            )
        if self.search_repair:  # parsed first, so its errors name its own flag
            RepairPipeline.parse(self.search_repair, flag="--search-repair")
        if self.distill_size and not any(
            isinstance(step, DistillStep)
            for text in {self.repair, self.loop_repair}
            for step in RepairPipeline.parse(text).steps
        ):
            raise UserError(
                f"--distill-size applies to the kd repair step, which --repair {self.repair!r} does not run: add it "
                "(e.g. --repair obs>bn>naive@block+logits>kd) or drop --distill-size"
            )
        level_rule(self.level_inputs, self.loop_repair)  # a contradictory --level-inputs is refused before any work
        if self.transform:  # a malformed transform is named as such, whatever the dataset
            TransformSpec.from_dict(self.transform)
        if self.dataset == "digits" and (self.transform or self.download):
            key = "transform" if self.transform else "download"
            raise UserError(
                f"config key {key!r} does not apply to the built-in digits (8x8 arrays, nothing to download or "
                "transform): drop it, or set dataset: imagefolder (or cifar10, mnist, ...)"
            )
        return self

    def study_key_fields(self) -> dict[str, Any]:
        """The options that change what a search trial's score means (evo's own only under evo)."""
        keyed = ("always", "evo") if self.optimizer == "evo" else ("always",)
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["study_key"] in keyed}

    def updated(self, **kw: Any) -> "RunConfig":
        """Copy with the given non-None values replaced."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def option_fields(with_flag: bool = False) -> list[Field]:
    """The options of ``RunConfig`` (only those with a command-line flag when ``with_flag``)."""
    return [f for f in fields(RunConfig) if not with_flag or f.metadata["help"] is not None]
