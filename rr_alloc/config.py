"""Run configuration: one frozen dataclass whose fields declare every option once.

Each field's metadata (``option``: help, choices, flag group, check, whether it keys a search study) is the
single declaration from which the command-line flags (``cli/flags.py``), the YAML keys, validation and the
search study's settings key are generated. YAML keys are the long flag names with underscores
(``calib_size: 1024``); values may use environment variables (``${RR_ALLOC_SHARED}/weights/...``). Files are
read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .data import DataSpec
from .errors import UserError
from .profile import DEFAULT_GRID
from .repair import DEFAULT_REPAIR
from .transforms import TransformSpec

__all__ = ["RunConfig", "load_config_file", "resolve_device", "option_fields", "study_key_fields", "GROUPS"]

Check = Callable[[Any], "str | None"]  # the problem with a value, or None


# ------------------------------------------------------------------ checks
def _int(lo: int) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo
        return None if ok else f"a whole number >= {lo}"

    return check


def _real(lo: float, hi: float | None = None, open_lo: bool = True) -> Check:
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


# flag groups of the commands that build a run, in the order --help shows them
GROUPS = {"data": "model and data (override the config file)", "alloc": "profile, allocation and repair",
          "search": "optuna allocator"}


def option(default: Any, check: Check, help: str | None = None, group: str | None = None, *,
           choices: tuple[str, ...] | None = None, kind: type = str, many: bool = False,
           flag: str | None = None, study_key: str | None = None) -> Any:
    """A ``RunConfig`` field declared once: its default, value ``check`` (None is allowed when the default is
    None), and, for options with a flag, ``help`` and ``group`` (``GROUPS``), ``choices``, the value ``kind``
    (``int``, ``float``, ``str``, ``bool``), ``many`` (a list), ``flag`` (another flag name, e.g. ``--no-cache``
    for a switch that turns the option off). ``study_key``: ``always`` or ``evo`` when the option changes what
    a search trial's score means (it then keys the study).
    """
    meta = {"check": check, "help": help, "group": group, "choices": choices, "kind": kind, "many": many,
            "flag": flag, "study_key": study_key}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    # model
    model: str = option("digits_resnet", _str, "zoo name (see `list`), torchvision model, or "
                        "package.module:factory (imports and runs that code)", "data")
    checkpoint: str | None = option(None, _str, "state_dict file, loaded with weights_only=True", "data")
    num_classes: int | None = option(None, _int(1), "classifier outputs when building the model", "data", kind=int)
    pretrained: bool = option(False, _bool, "torchvision models: download the DEFAULT weights", "data", kind=bool)
    # data
    dataset: str = option("digits", _str, "digits | imagefolder | cifar10 | cifar100 | mnist | fashionmnist", "data")
    train_data: str | None = option(None, _str, "training images: ImageFolder directory or torchvision root", "data")
    test_data: str | None = option(None, _str, "test images (reporting only): ImageFolder directory or root", "data")
    transform: dict[str, Any] | None = option(None, _mapping)  # config files only: overrides the model's transform
    download: bool = option(False, _bool)                        # config files only: torchvision datasets
    calib_size: int | None = option(None, _int(1), "calibration images from the training data (default 1024; "
                                    "512 for the 1,400-image digits pool)", "data", kind=int)
    selection_size: int | None = option(None, _int(0), "held-out selection images, disjoint (default: as "
                                        "--calib-size)", "data", kind=int)
    eval_size: int | None = option(None, _int(1), "test images to report on (default: all)", "data", kind=int)
    batch_size: int = option(256, _int(1), "images per forward", "data", kind=int)
    seed: int = option(0, _int(0), "seed of the calibration/selection draw", "data", kind=int)
    # execution
    device: str = option("auto", _str, "auto | cpu | cuda", "data")
    threads: int | None = option(None, _int(1), "torch CPU threads", "data", kind=int)
    cache: bool = option(True, _bool, "recompute the RR profile instead of reusing a cached one", "data",
                         kind=bool, flag="--no-cache")
    cache_dir: str | None = option(None, _str, "cache directory (default $RR_ALLOC_CACHE, else ~/.cache/rr_alloc)",
                                   "data")
    # profile
    grid: tuple[float, ...] = option(DEFAULT_GRID, _grid, "probe sparsities of the RR profile", "alloc",
                                     kind=float, many=True)
    s_max: float = option(0.99, _real(0.0, 1.0), "per-layer sparsity cap; the grid must reach it", "alloc",
                          kind=float, study_key="always")
    include: tuple[str, ...] = option((), _strs, "layer-name patterns to allocate (default: all Conv2d/Linear)",
                                      "alloc", many=True)
    exclude: tuple[str, ...] = option((), _strs, "layer-name patterns to leave dense", "alloc", many=True)
    lam: str = option("mean", _str)  # config files only: the ASR shrinkage rule of the RR profile
    # allocation
    allocator: str = option("global", _str, "allocator (see `list`; default global, the best on the selection "
                            "split of studies/allocation_comparison.py)", "alloc")
    reference: str | None = option(None, _str, "allocator verified side by side (default global; rr-greedy when "
                                   "--allocator is global)", "alloc")
    unit: str = option("weights", _str, "count the budget in weights or FLOPs (MACs)", "alloc",
                       choices=("weights", "flops"), study_key="always")
    layer_weights: str = option("uniform", _str, "per-layer weights of the RR objective", "alloc",
                                choices=("uniform", "sensitivity"), study_key="always")
    pattern: str | None = option(None, _str, "N:M semi-structured pruning instead of a budget, e.g. 2:4 (keep 2 of "
                                 "every 4 input channels at one kernel position; layers whose inputs are not a "
                                 "multiple of M stay dense)", "alloc")
    # repair / verification (bn>naive@block+logits: studies/repair_ablation.py, selection split)
    repair: str = option(DEFAULT_REPAIR, _str, "repair pipeline for verification, e.g. bn or "
                         "lsq>bn>naive@block+logits", "alloc")
    profile_repair: str = option("channel", _str, "repair the RR profile measures: channel or lsq[:damp=X] "
                                 "(least-squares re-fit of the kept weights; the RR allocators then plan for it)",
                                 "alloc")
    # search (--allocator optuna)
    n_trials: int = option(30, _int(0), "trials this process adds to the study (0: write the plan from the "
                           "study's best trial)", "search", kind=int)
    timeout: float | None = option(None, _real(0.0), "stop the study after this many seconds", "search", kind=float)
    storage: str | None = option(None, _str, "Optuna storage: sqlite:///FILE, postgresql+psycopg://USER@HOST/DB "
                                 "(several machines), or a journal file *.log (default: SQLite file beside the "
                                 "plan)", "search")
    study_name: str | None = option(None, _str, "Optuna study name (default: keyed on the model, image and "
                                    "settings fingerprints, so workers anywhere with the same inputs share it)",
                                    "search")
    total_trials: int | None = option(None, _int(1), "stop every worker once the study holds this many evaluated "
                                      "trials (completed, or screened out by evo)", "search", kind=int)
    heartbeat_interval: int = option(60, _int(1), "seconds between a running trial's heartbeats (database "
                                     "storages)", "search", kind=int)
    grace_period: int | None = option(None, _int(1), "seconds without a heartbeat after which a trial is failed "
                                      "and re-run (default twice the interval)", "search", kind=int)
    max_retry: int = option(2, _int(0), "re-runs of a killed worker's trial", "search", kind=int)
    objective: str = option("kl", _str, "search objective on the selection split (kl is label-free)", "search",
                            choices=("kl", "agreement", "top1"), study_key="always")
    optimizer: str = option("evo", _str, "search of --allocator optuna: evo (block moves from global magnitude), "
                            "cmaes (per-layer magnitude multipliers started at global magnitude) or tpe-mix "
                            "(mixes of the baseline plans)", "search", choices=("evo", "cmaes", "tpe-mix"),
                            study_key="always")
    guidance: str = option("rr", _str, "evo: draw moves by the RR profile's marginal repaired distortion (rr) or "
                           "uniformly (none)", "search", choices=("rr", "none"), study_key="evo")
    screen_size: int | None = option(None, _int(1), "evo: selection images a candidate is screened on before its "
                                     "full score (default a quarter of the selection split)", "search", kind=int,
                                     study_key="evo")
    search_step: float = option(0.05, _real(0.0, 1.0), "evo: a move shifts this fraction of the smaller layer's "
                                "weights", "search", kind=float, study_key="evo")
    search_repair: str | None = option(None, _str, "repair that scores search candidates (default: --repair); "
                                       "e.g. the fast channel-wise bn>naive@block+logits while --repair obs>... "
                                       "verifies the plan", "search")
    validation_size: int = option(0, _int(0), "training images held out from calibration and selection: a "
                                  "searched plan is kept only when it beats global magnitude there (0: no check)",
                                  "search", kind=int)
    # output
    out: str | None = option(None, _str)  # config files only: each command declares its own --out

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
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            problem = f.metadata["check"](value)
            if problem:
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                raise UserError(f"{f.name} (--{f.name.replace('_', '-')}) must be {problem}, got {shown}: "
                                "fix the flag, the config file key or the plan's value")
        return self

    def updated(self, **kw: Any) -> "RunConfig":
        """Copy with the given non-None values replaced."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def option_fields(with_flag: bool = False) -> list[Field]:
    """The options of ``RunConfig`` (only those with a command-line flag when ``with_flag``)."""
    return [f for f in fields(RunConfig) if not with_flag or f.metadata["help"] is not None]


def study_key_fields(cfg: RunConfig) -> dict[str, Any]:
    """The options that change what a search trial's score means (evo's own only under evo)."""
    keyed = ("always", "evo") if cfg.optimizer == "evo" else ("always",)
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata["study_key"] in keyed}


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
        if known[key].metadata["many"] and v is not None:
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
