"""Flags shared by the commands, and the ``RunConfig`` they build.

Flags override the config file's values, which override the defaults in
``RunConfig`` (or, for commands that replay a plan, the plan's source block).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import Field
from pathlib import Path
from typing import Any

from ..allocators import allocator_class
from ..config.files import load_config_file
from ..config.run_config import GROUPS, RunConfig, option_fields
from ..errors import UserError
from ..plans.plan import Plan
from ..plans.replay import check_plan_model, config_from_plan
from ..repair import RepairPipeline

__all__ = [
    "REPLAY_GROUPS",
    "check_split_size",
    "refuse_search_flags",
    "Parser",
    "add_run_flags",
    "add_plan_flags",
    "config_from_args",
    "config_for_plan",
    "parse_budget",
    "file_config",
    "given_flags",
    "default_out",
    "EMBEDDED_NOTE",
]

EMBEDDED_NOTE = (
    "This ran the embedded default (a 7-layer residual CNN trained on scikit-learn's bundled "
    "digits). Point rr_alloc at a real model with e.g.\n  python -m rr_alloc search --budget 0.9 "
    "--config configs/cifar10_resnet20.yaml   (after export RR_ALLOC_SHARED=/path/to/shared)\n"
    "or --model NAME|package.module:factory --checkpoint FILE --dataset imagefolder "
    "--train-data DIR --test-data DIR."
)


def budget_parser(flag: str = "--budget") -> Callable[[str], float]:
    """The one check of a global sparsity budget given on the command line: a number in (0, 1)."""

    def parse(text: str) -> float:
        try:
            b = float(text)
        except ValueError:
            raise UserError(f"{flag} must be a number in (0, 1), got {text!r}: pass e.g. {flag} 0.9")
        if not 0.0 < b < 1.0:
            raise UserError(f"{flag} must lie in (0, 1), got {b}: pass a fraction such as 0.9")
        return b

    return parse


parse_budget = budget_parser("--budget")


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kw: Any) -> None:
        # no prefixes: compare --budget would be taken for --budgets, --out for --out-dir
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def error(self, message: str) -> None:  # one line, exit 2, as every other bad input
        raise UserError(f"{message} (see --help)")


SCORED_SPLITS = ("test", "selection")  # what verify and compare may report on (--split)
REPLAY_GROUPS = ("data", "repair")  # what verify, apply and export take besides the plan


def add_run_flags(p: argparse.ArgumentParser, groups: tuple[str, ...] = tuple(GROUPS)) -> None:
    """The flags of ``groups`` (``GROUPS``: model and data, allocation, repair, search), generated from
    ``RunConfig``'s fields. A command that replays a plan takes no allocation or search flags: the plan
    decides those, and a flag it would ignore is refused by argparse instead."""
    made = {key: p.add_argument_group(GROUPS[key]) for key in groups}
    made["data"].add_argument("--config", help="YAML config file (keys = long flag names with underscores)")
    for f in option_fields(with_flag=True):
        m = f.metadata
        if m["group"] not in made:
            continue
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "help": _help(f)}
        if m["kind"] is bool:  # a switch: --pretrained turns it on, --no-cache off; unset keeps the file's value
            kw.update(action="store_false" if f.default else "store_true", default=None)
        else:
            kw.update(type=m["kind"], choices=m["choices"], nargs="+" if m["many"] else None)
        made[m["group"]].add_argument(flag, **kw)


def _help(f: Field) -> str:
    """The field's help, with its default unless the help describes it or there is none to show."""
    text, default = f.metadata["help"], f.default
    if f.metadata["kind"] is bool or default is None or default == () or "default" in text:
        return text
    shown = " ".join(f"{v:g}" for v in default) if isinstance(default, tuple) else default
    return f"{text} (default {shown})"


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """``--plan`` and the trust flag of the commands that rebuild a plan's model."""
    p.add_argument("--plan", required=True, help="plan JSON written by search")
    p.add_argument(
        "--trust-plan-model",
        action="store_true",
        help="import and run the plan's package.module:factory model (refused by default: a plan "
        "file alone never makes rr_alloc run code; --model with the same spec also allows it)",
    )


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- base (e.g. a plan's source) <- config file <- flags."""
    kw: dict[str, Any] = dict(base or {})
    kw.update(file_config(args))
    kw.update({k: tuple(v) if isinstance(v, list) else v for k, v in given_flags(args).items()})
    return RunConfig(**kw).validate()


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The options given as flags on the command line."""
    fs = option_fields(with_flag=True)
    return {f.name: getattr(args, f.name) for f in fs if getattr(args, f.name, None) is not None}


def file_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--config`` file's keys (none without one); a key a flag overrides may name an unset variable."""
    if not getattr(args, "config", None):
        return {}
    # a command's own --out overrides the file's out: key too
    given = set(given_flags(args)) | ({"out"} if getattr(args, "out", None) is not None else set())
    return load_config_file(args.config, overridden=given)


def refuse_search_flags(args: argparse.Namespace, allocators: list[str]) -> None:
    """Search flags that none of ``allocators`` reads would be ignored: refuse them instead."""
    reads = [allocator_class(a).search_options for a in allocators]
    if any(r is None for r in reads):  # a search reads every one
        return
    keys = set(file_config(args))
    for f in option_fields(with_flag=True):
        if f.metadata["group"] != "search" or any(f.name in r for r in reads):
            continue
        if getattr(args, f.name, None) is not None or f.name in keys:
            given = f"--{f.name.replace('_', '-')}" if f.name not in keys else f"config key {f.name!r}"
            raise UserError(
                f"{given} applies to the end-to-end search, which this run does not do: drop it, or search "
                "with --allocator optuna (compare: --allocators ... optuna)"
            )


def check_split_size(cfg: RunConfig, split: str) -> None:
    """A command that reports on ``split`` needs images there (the selection split may be set to 0)."""
    if split == "selection" and cfg.selection_size == 0:
        raise UserError("--split selection needs selection images, but --selection-size is 0: raise it")


def config_for_plan(args: argparse.Namespace, plan: Plan) -> RunConfig:
    """The run config of a command that replays ``plan``; refuses plan-named code before any import, and
    config-file keys the plan decides (its pattern, allocation and search), which would be ignored or would
    contradict what the plan reports."""
    if getattr(args, "config", None):
        groups = {f.name: f.metadata["group"] for f in option_fields()}
        for key in file_config(args):
            if groups.get(key) in ("alloc", "search") or key == "out":
                raise UserError(
                    f"config file {args.config}: key {key!r} does not apply when replaying a plan (the plan decides "
                    "it): drop it, or use a config of model, data and repair keys only"
                )
    if getattr(args, "repair", None) is None:  # the plan's own text: its errors name the plan, not a flag
        RepairPipeline.parse(plan.repair, flag="the plan's repair")
    if not plan.source and getattr(args, "model", None) is None:
        raise UserError("the plan has no source block: pass --model (and --checkpoint, --dataset, ...) to rebuild it")
    cfg = config_from_args(args, base=config_from_plan(plan))
    if plan.mask_rule == "obs" and RepairPipeline.parse(cfg.repair).mask_rule != "obs":
        if getattr(args, "repair", None) is None:
            raise UserError(
                f"the plan's mask_rule is obs, but its repair {plan.repair!r} has no obs step to choose the masks: "
                "the plan was edited; regenerate it with `rr_alloc search`"
            )
        raise UserError(
            f"the plan's masks are chosen by its repair's obs step (mask_rule obs), but --repair {cfg.repair} would "
            "prune by magnitude: pass a pipeline with an obs step, or leave --repair out (the plan's own)"
        )
    check_plan_model(plan, cfg.model, getattr(args, "model", None), bool(getattr(args, "trust_plan_model", False)))
    return cfg


def default_out(cfg: RunConfig, budget: float | None) -> Path:
    """``runs/<model>_<allocator>_b<budget>/plan.json`` (``_<N>of<M>`` for an N:M pattern)."""
    model = cfg.model.replace(":", "_").replace("/", "_").replace(".", "_")
    tail = f"{cfg.pattern.replace(':', 'of')}" if cfg.pattern else f"{cfg.allocator}_b{budget:g}"
    return Path("runs") / f"{model}_{tail}" / "plan.json"
