"""Run configuration: one frozen dataclass, filled from a YAML file and then CLI flags.

YAML keys are the long flag names with underscores (``calib_size: 1024``);
values may use environment variables (``${RR_ALLOC_SHARED}/weights/...``).
Files are read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .data import DataSpec
from .errors import UserError
from .transforms import TransformSpec
from .profile import DEFAULT_GRID
from .repair import DEFAULT_REPAIR

__all__ = ["RunConfig", "load_config_file", "resolve_device"]


@dataclass(frozen=True)
class RunConfig:
    # model
    model: str = "digits_resnet"         # zoo name, torchvision name, or package.module:factory
    checkpoint: str | None = None        # state_dict file (weights_only load)
    num_classes: int | None = None       # None: the model's default
    pretrained: bool = False             # torchvision models: download the DEFAULT weights
    # data
    dataset: str = "digits"              # digits | imagefolder | cifar10 | cifar100 | mnist | fashionmnist
    train_data: str | None = None
    test_data: str | None = None
    transform: dict[str, Any] | None = None  # overrides the model's default transform
    download: bool = False
    calib_size: int | None = None        # images; None: 1024 (512 for the 1,400-image digits pool)
    selection_size: int | None = None    # images; None: as calib_size
    validation_size: int = 0             # training images after selection: a searched plan must beat global there
    eval_size: int | None = None         # test images for reporting; None = all
    batch_size: int = 256
    seed: int = 0                        # calibration/selection draw
    # profile
    grid: tuple[float, ...] = DEFAULT_GRID
    s_max: float = 0.99                  # per-layer sparsity cap; the grid must reach it
    include: tuple[str, ...] = ()        # shell patterns of layer names to allocate
    exclude: tuple[str, ...] = ()
    lam: str = "mean"                    # ASR shrinkage rule of the RR profile
    profile_repair: str = "channel"      # repair the RR profile measures: channel | lsq[:damp=X]
    # allocation
    allocator: str = "global"            # best on the selection split in studies/allocation_comparison.py
    reference: str | None = None         # plan verified side by side; None: global magnitude
                                         # (or rr-greedy when the plan itself is global magnitude)
    unit: str = "weights"                # budget counted in weights or flops (MACs)
    pattern: str | None = None           # "N:M" semi-structured masks instead of a budget (e.g. "2:4")
    layer_weights: str = "uniform"       # RR objective weights: uniform | sensitivity
    # repair / verification
    repair: str = DEFAULT_REPAIR         # bn>naive@block+logits: studies/repair_ablation.py (selection split)
    # optuna
    n_trials: int = 30
    timeout: float | None = None
    storage: str | None = None
    objective: str = "kl"                # kl | agreement | top1 (selection split)
    study_name: str | None = None        # None: keyed on the model, image and settings fingerprints
    total_trials: int | None = None      # stop every worker once the study holds this many evaluated (complete or screened-out) trials
    heartbeat_interval: int = 60         # s; RDB storages: a killed worker's trial fails after the grace period
    grace_period: int | None = None      # s; None: Optuna's default, twice the heartbeat interval
    max_retry: int = 2                   # re-runs of a killed worker's trial
    optimizer: str = "evo"               # evo | cmaes | tpe-mix (studies/allocation_comparison.py --search)
    guidance: str = "rr"                 # evo: rr (RR-profile move probabilities) | none
    screen_size: int | None = None       # evo: selection images of the screen; None: a quarter of the split
    search_step: float = 0.05            # evo: block move, as a fraction of the smaller layer
    search_repair: str | None = None     # repair in the search loop; None: the run's repair
    # execution
    device: str = "auto"
    threads: int | None = None
    out: str | None = None
    cache: bool = True                   # reuse RR profiles from the cache directory
    cache_dir: str | None = None         # None: $RR_ALLOC_CACHE, else ~/.cache/rr_alloc

    def data_spec(self, default_transform: TransformSpec | None) -> DataSpec:
        tf = TransformSpec.from_dict(self.transform) if self.transform else default_transform
        small = self.dataset == "digits"
        calib = self.calib_size if self.calib_size is not None else (512 if small else 1024)
        sel = self.selection_size if self.selection_size is not None else (512 if small else 1024)
        return DataSpec(kind=self.dataset, train=self.train_data, test=self.test_data, transform=tf,
                        calib_size=calib, selection_size=sel, validation_size=self.validation_size,
                        eval_size=self.eval_size, seed=self.seed, download=self.download)

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
        for name, rule in _RULES.items():
            value = getattr(self, name)
            if value is None and rule[1]:
                continue
            problem = rule[0](value)
            if problem:
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                raise UserError(f"{name} (--{name.replace('_', '-')}) must be {problem}, got {shown}: "
                                "fix the flag, the config file key or the plan's value")
        return self

    def updated(self, **kw: Any) -> "RunConfig":
        """Copy with the given non-None values replaced."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def _int(lo: int) -> Any:
    def check(v: Any) -> str | None:
        ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo
        return None if ok else f"a whole number >= {lo}"
    return check


def _real(lo: float, hi: float | None = None, open_lo: bool = True) -> Any:
    def check(v: Any) -> str | None:
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if open_lo else v >= lo) and (hi is None or v < hi)
        rng = f"in ({lo}, {hi})" if hi is not None else (f"> {lo}" if open_lo else f">= {lo}")
        return None if ok else f"a finite number {rng}"
    return check


def _str(v: Any) -> str | None:
    return None if isinstance(v, str) and v and v.isprintable() else "a non-empty single-line string"


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _strs(v: Any) -> str | None:
    return None if isinstance(v, (tuple, list)) and all(_str(x) is None for x in v) else "a list of strings"


def _grid(v: Any) -> str | None:
    ok = isinstance(v, (tuple, list)) and len(v) > 0 and all(_real(0.0, 1.0)(x) is None for x in v)
    return None if ok else "a list of finite sparsities in (0, 1), e.g. 0.5 0.9 0.99"


def _mapping(v: Any) -> str | None:
    return None if isinstance(v, dict) else "a mapping (e.g. {mean: [...], std: [...]})"


# field -> (check returning the problem or None, None allowed)
_RULES: dict[str, tuple[Any, bool]] = {
    "model": (_str, False), "checkpoint": (_str, True), "num_classes": (_int(1), True),
    "pretrained": (_bool, False), "dataset": (_str, False), "train_data": (_str, True), "test_data": (_str, True),
    "transform": (_mapping, True), "download": (_bool, False), "calib_size": (_int(1), True),
    "selection_size": (_int(0), True), "validation_size": (_int(0), False), "eval_size": (_int(1), True), "batch_size": (_int(1), False),
    "seed": (_int(0), False), "grid": (_grid, False), "s_max": (_real(0.0, 1.0), False),
    "include": (_strs, False), "exclude": (_strs, False), "lam": (_str, False), "profile_repair": (_str, False),
    "allocator": (_str, False), "reference": (_str, True), "unit": (_str, False), "pattern": (_str, True),
    "layer_weights": (_str, False), "repair": (_str, False), "n_trials": (_int(0), False),
    "timeout": (_real(0.0), True), "storage": (_str, True), "objective": (_str, False),
    "study_name": (_str, True), "total_trials": (_int(1), True), "heartbeat_interval": (_int(1), False),
    "grace_period": (_int(1), True), "max_retry": (_int(0), False),
    "optimizer": (_str, False), "guidance": (_str, False), "screen_size": (_int(1), True),
    "search_step": (_real(0.0, 1.0), False), "search_repair": (_str, True), "device": (_str, False),
    "threads": (_int(1), True), "out": (_str, True), "cache": (_bool, False), "cache_dir": (_str, True),
}


_ENV = re.compile(r"\$\{([^}]+)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name = m.group(1) or m.group(2)
            if name not in os.environ:
                raise UserError(f"{where} uses ${{{name}}}, which is not set: export {name}=PATH "
                                "(see the README) or pass the path as a flag")
            return os.environ[name]
        return os.path.expanduser(_ENV.sub(sub, value))
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config (safe_load) into validated ``RunConfig`` keyword arguments."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist: pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(raw, dict):
        raise UserError(f"config file {p} must be a mapping of option: value")
    known = {f.name: f for f in fields(RunConfig)}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = str(k).replace("-", "_")
        if key == "budget":
            continue  # the budget is a search argument, read by the CLI
        if key not in known:
            raise UserError(f"config file {p}: unknown key {k!r}; known keys: {', '.join(sorted(known))}")
        if key in ("grid", "include", "exclude") and v is not None:
            v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
        out[key] = _expand(v, f"config file {p} ({k})")
    return out


def resolve_device(name: str):
    """``auto`` picks CUDA when present; an unavailable ``cuda`` is a one-line error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)
