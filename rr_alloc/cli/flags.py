"""Flags shared by the commands, and the ``RunConfig`` they build.

Flags override the config file's values, which override the defaults in
``RunConfig`` (or, for commands that replay a plan, the plan's source block).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config_file
from ..errors import UserError
from ..plan import Plan
from ..replay import check_plan_model, config_from_plan

__all__ = ["Parser", "add_run_flags", "add_plan_flags", "config_from_args", "config_for_plan", "parse_budget",
           "default_out", "EMBEDDED_NOTE"]

EMBEDDED_NOTE = ("This ran the embedded default (a 7-layer residual CNN trained on scikit-learn's bundled "
                 "digits). Point rr_alloc at a real model with e.g.\n  python -m rr_alloc search --budget 0.9 "
                 "--config configs/cifar10_resnet20.yaml   (after export RR_ALLOC_SHARED=/path/to/shared)\n"
                 "or --model NAME|package.module:factory --checkpoint FILE --dataset imagefolder "
                 "--train-data DIR --test-data DIR.")


def parse_budget(text: str) -> float:
    try:
        b = float(text)
    except ValueError:
        raise UserError(f"--budget must be a number in (0, 1), got {text!r}: pass e.g. --budget 0.9")
    if not 0.0 < b < 1.0:
        raise UserError(f"--budget must lie in (0, 1), got {b}: pass a fraction such as 0.9")
    return b


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as every other bad input
        raise UserError(f"{message} (see --help)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The model, data, profile, allocation, repair and Optuna flags (all commands that build a run)."""
    g = p.add_argument_group("model and data (override the config file)")
    g.add_argument("--config", help="YAML config file (keys = long flag names with underscores)")
    g.add_argument("--model", help="zoo name (see `list`), torchvision model, or package.module:factory "
                   "(imports and runs that code)")
    g.add_argument("--checkpoint", help="state_dict file, loaded with weights_only=True")
    g.add_argument("--num-classes", type=int, help="classifier outputs when building the model")
    g.add_argument("--pretrained", action="store_true", default=None,
                   help="torchvision models: download the DEFAULT weights")
    g.add_argument("--dataset", help="digits | imagefolder | cifar10 | cifar100 | mnist | fashionmnist")
    g.add_argument("--train-data", help="training images: ImageFolder directory or torchvision root")
    g.add_argument("--test-data", help="test images (reporting only): ImageFolder directory or root")
    g.add_argument("--calib-size", type=int, help="calibration images from the training data (default 1024)")
    g.add_argument("--selection-size", type=int, help="held-out selection images, disjoint (default 1024)")
    g.add_argument("--eval-size", type=int, help="test images to report on (default: all)")
    g.add_argument("--batch-size", type=int, help="images per forward (default 256)")
    g.add_argument("--seed", type=int, help="seed of the calibration/selection draw (default 0)")
    g.add_argument("--device", help="auto | cpu | cuda (default auto)")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                   help="recompute the RR profile instead of reusing a cached one")
    g.add_argument("--cache-dir", help="cache directory (default $RR_ALLOC_CACHE, else ~/.cache/rr_alloc)")
    r = p.add_argument_group("profile, allocation and repair")
    r.add_argument("--grid", type=float, nargs="+", help="probe sparsities of the RR profile")
    r.add_argument("--s-max", type=float, help="per-layer sparsity cap (default 0.99)")
    r.add_argument("--include", nargs="+", help="layer-name patterns to allocate (default: all Conv2d/Linear)")
    r.add_argument("--exclude", nargs="+", help="layer-name patterns to leave dense")
    r.add_argument("--allocator", help="allocator (see `list`; default global, the best on the selection split of "
                   "studies/allocation_comparison.py)")
    r.add_argument("--reference", help="allocator verified side by side (default global; rr-greedy when --allocator is global)")
    r.add_argument("--unit", choices=["weights", "flops"], help="count the budget in weights or FLOPs (MACs)")
    r.add_argument("--layer-weights", choices=["uniform", "sensitivity"],
                   help="per-layer weights of the RR objective (default uniform)")
    r.add_argument("--pattern", help="N:M semi-structured pruning instead of a budget, e.g. 2:4 (keep 2 of every "
                   "4 input channels at one kernel position; layers whose inputs are not a multiple of M stay dense)")
    r.add_argument("--repair", help="repair pipeline for verification, e.g. bn or lsq>bn>naive@block+logits")
    r.add_argument("--profile-repair", help="repair the RR profile measures: channel (default) or lsq[:damp=X] "
                   "(least-squares re-fit of the kept weights; the RR allocators then plan for it)")
    o = p.add_argument_group("optuna allocator")
    o.add_argument("--n-trials", type=int, help="trials this process adds to the study (default 30; 0: write "
                   "the plan from the study's best trial)")
    o.add_argument("--timeout", type=float, help="stop the study after this many seconds")
    o.add_argument("--storage", help="Optuna storage: sqlite:///FILE, postgresql+psycopg://USER@HOST/DB (several "
                   "machines), or a journal file *.log (default: SQLite file beside the plan)")
    o.add_argument("--study-name", help="Optuna study name (default: keyed on the model, image and settings "
                   "fingerprints, so workers anywhere with the same inputs share it)")
    o.add_argument("--total-trials", type=int, help="stop every worker once the study holds this many "
                   "evaluated trials (completed, or screened out by evo)")
    o.add_argument("--heartbeat-interval", type=int, help="seconds between a running trial's heartbeats "
                   "(database storages; default 60)")
    o.add_argument("--grace-period", type=int, help="seconds without a heartbeat after which a trial is failed "
                   "and re-run (default twice the interval)")
    o.add_argument("--max-retry", type=int, help="re-runs of a killed worker's trial (default 2)")
    o.add_argument("--objective", choices=["kl", "agreement", "top1"],
                   help="search objective on the selection split (default kl, label-free)")
    o.add_argument("--optimizer", choices=["evo", "cmaes", "tpe-mix"],
                   help="search of --allocator optuna: evo (block moves from global magnitude, default), cmaes "
                        "(per-layer magnitude multipliers started at global magnitude) or tpe-mix (mixes of "
                        "the baseline plans)")
    o.add_argument("--guidance", choices=["rr", "none"],
                   help="evo: draw moves by the RR profile's marginal repaired distortion (rr, default) or "
                        "uniformly (none)")
    o.add_argument("--screen-size", type=int, help="evo: selection images a candidate is screened on before its "
                   "full score (default a quarter of the selection split)")
    o.add_argument("--search-step", type=float, help="evo: a move shifts this fraction of the smaller layer's "
                   "weights (default 0.05)")
    o.add_argument("--search-repair", help="repair that scores search candidates (default: --repair); e.g. the fast "
                   "channel-wise bn>naive@block+logits while --repair obs>... verifies the plan")
    o.add_argument("--validation-size", type=int, help="training images held out from calibration and selection: "
                   "a searched plan is kept only when it beats global magnitude there (default 0: no check)")


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """``--plan`` and the trust flag of the commands that rebuild a plan's model."""
    p.add_argument("--plan", required=True, help="plan JSON written by search")
    p.add_argument("--trust-plan-model", action="store_true",
                   help="import and run the plan's package.module:factory model (refused by default: a plan "
                        "file alone never makes rr_alloc run code; --model with the same spec also allows it)")


_RUN_KEYS = ("model", "checkpoint", "num_classes", "pretrained", "dataset", "train_data", "test_data",
             "calib_size", "selection_size", "eval_size", "batch_size", "seed", "device", "threads", "cache", "cache_dir",
             "grid", "s_max", "include", "exclude", "allocator", "reference", "unit", "layer_weights", "repair",
             "profile_repair", "pattern",
             "n_trials", "timeout", "storage", "objective", "study_name", "total_trials", "heartbeat_interval",
             "grace_period", "max_retry", "validation_size", "optimizer", "guidance", "screen_size", "search_step", "search_repair")


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- base (e.g. a plan's source) <- config file <- flags."""
    kw: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        kw.update(load_config_file(args.config))
    for k in _RUN_KEYS:
        v = getattr(args, k, None)
        if v is not None:
            kw[k] = tuple(v) if isinstance(v, list) else v
    return RunConfig(**kw).validate()


def config_for_plan(args: argparse.Namespace, plan: Plan) -> RunConfig:
    """The run config of a command that replays ``plan``; refuses plan-named code before any import."""
    cfg = config_from_args(args, base=config_from_plan(plan))
    check_plan_model(plan, cfg.model, getattr(args, "model", None), bool(getattr(args, "trust_plan_model", False)))
    return cfg


def default_out(cfg: RunConfig, budget: float | None) -> Path:
    """``runs/<model>_<allocator>_b<budget>/plan.json`` (``_<N>of<M>`` for an N:M pattern)."""
    model = cfg.model.replace(":", "_").replace("/", "_").replace(".", "_")
    tail = f"{cfg.pattern.replace(':', 'of')}" if cfg.pattern else f"{cfg.allocator}_b{budget:g}"
    return Path("runs") / f"{model}_{tail}" / "plan.json"
