"""``search``, ``verify`` and ``list``: make a plan, check a plan, show what is registered."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .. import evidence
from ..allocators import ALLOCATORS, allocator_class
from ..api import allocate, verify
from ..config.run_config import RunConfig
from ..errors import UserError
from ..models import list_models
from ..models.sources import SOURCES
from ..nn.metrics import Metrics, wilson_interval
from ..nn.pruning import parse_pattern
from ..plans.build import plan_budget
from ..plans.plan import Plan
from ..plans.replay import session_for_plan
from ..plans.report import (
    layer_table,
    plot_rr_curves,
    plot_search_progress,
    rule_choice_lines,
    search_lines,
    write_profile_csv,
)
from ..repair import PRESETS, ReconstructStep, RepairPipeline
from ..repair.steps import step_kinds
from ..search.runner import heartbeat
from ..search.scoring import NO_SELECTION
from ..search.storage import check_storage, discard_if_empty, storage_file
from ..search.study import StudySettings, summary_lines
from ..session import Session
from ..system.files import staged_folder
from .flags import (
    EMBEDDED_NOTE,
    REPLAY_GROUPS,
    SCORED_SPLITS,
    add_plan_flags,
    add_run_flags,
    check_split_size,
    config_for_plan,
    config_from_args,
    default_out,
    file_config,
    parse_budget,
    refuse_search_flags,
)
from .outputs import check_command_output, outputs_in_place

__all__ = ["register", "metrics_row", "run_search", "SIDE_FILES"]

SIDE_FILES = ("profile.csv", "rr_curves.png")  # written beside every plan


def register(sub: Any) -> None:  # argparse's subparsers object (its class is not public)
    s = sub.add_parser(
        "search",
        help="profile RR, allocate a global budget, verify, write the plan",
        description="Profile each layer's Relative Repairability on calibration images, "
        "allocate the budget, verify the plan (and the reference baseline) with "
        "prune -> repair -> evaluate, and write the plan JSON, profile CSV and "
        "RR-curve figure.",
    )
    s.add_argument(
        "--budget",
        type=parse_budget,
        help="global sparsity in (0, 1): fraction of all prunable "
        "weights (or MACs with --unit flops) set to zero; required unless --pattern is given",
    )
    add_run_flags(s)
    s.add_argument("--out", help="plan JSON path (default runs/<model>_<allocator>_b<budget>/plan.json)")
    s.add_argument("--no-verify", dest="verify", action="store_false", help="skip verification (plan only)")
    s.set_defaults(handler=cmd_search)

    v = sub.add_parser(
        "verify",
        help="re-run a plan's verification: prune, repair, evaluate",
        description="Rebuild model and data from a plan's source block and verify it.",
    )
    add_plan_flags(v)
    v.add_argument("--split", choices=SCORED_SPLITS, default="test", help="split to evaluate on")
    add_run_flags(v, REPLAY_GROUPS)
    v.set_defaults(handler=cmd_verify)

    ls = sub.add_parser("list", help="registered models, allocators and repair pipelines")
    ls.set_defaults(handler=cmd_list)


def metrics_row(name: str, m: Metrics, sparsity: float | None, unit: str = "weights") -> dict[str, Any]:
    """One row of a verification table; the sparsity column names its unit (weights, or MACs). On unlabelled
    images the interval is the agreement's and there is no top-1 column."""
    lo, hi = wilson_interval(m.top1 if m.top1 is not None else m.agreement, m.n)
    top1 = {} if m.top1 is None else {"top1 %": round(100 * m.top1, 2)}
    return {
        "plan": name,
        **top1,
        "95% CI": f"{100 * lo:.1f}-{100 * hi:.1f}",
        "agreement %": round(100 * m.agreement, 2),
        "KL": round(m.kl, 4),
        "sparsity" if unit == "weights" else "MAC sparsity": None if sparsity is None else round(sparsity, 4),
    }


PATTERN_IGNORES = ("allocator", "reference", "unit", "layer_weights")  # flags of a budget's allocation


def refuse_level_search_flags(args: argparse.Namespace, cfg: RunConfig) -> None:
    """The search moves by database levels under a reconstruction repair and by weight fractions otherwise:
    the other kind's flags would be ignored, so they are refused."""
    if cfg.allocator != "optuna" or cfg.pattern:
        return
    steps = RepairPipeline.parse(cfg.loop_repair).steps
    levels = bool(steps) and isinstance(steps[0], ReconstructStep)
    keys = file_config(args)
    for name in ("search_step", "screen_size") if levels else ("stages", "ladder_step"):
        if getattr(args, name, None) is not None or name in keys:
            flag = f"--{name.replace('_', '-')}"
            if levels:
                raise UserError(
                    f"{flag} applies to the fraction-move search, but the search repair {cfg.loop_repair!r} "
                    "reconstructs, so the search moves by levels (--ladder-step, --stages): drop it"
                )
            raise UserError(
                f"{flag} applies to the level search, which runs when the search repair starts with lsq or obs; "
                f"{cfg.loop_repair!r} does not, so the search moves by fractions (--search-step): drop it"
            )


def refuse_budget_flags(args: argparse.Namespace) -> None:
    """An N:M pattern fixes every layer's count: allocation flags would be ignored, so they are refused."""
    given = [name for name in PATTERN_IGNORES if getattr(args, name, None) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(
            f"{flag} does not apply with --pattern (the N:M pattern fixes every layer's count, and it is verified "
            f"beside global magnitude at the same sparsity): drop {flag}, or pass --budget instead of --pattern"
        )


def cmd_search(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if (args.budget is None) == (cfg.pattern is None):
        raise UserError("pass --budget B (a fraction in (0, 1)) or --pattern N:M, exactly one of them")
    if cfg.pattern:
        parse_pattern(cfg.pattern)  # a malformed pattern fails before any model or data is loaded
        refuse_budget_flags(args)
    refuse_search_flags(args, [] if cfg.pattern else [cfg.allocator, cfg.reference_allocator])
    if not cfg.pattern and cfg.selection_size == 0:  # before any work, not after the profile
        for flag, name in (("--allocator", cfg.allocator), ("--reference", cfg.reference_allocator)):
            if allocator_class(name).needs.evaluate:
                raise UserError(NO_SELECTION.format(allocator=f"{flag} {name}"))
    if args.out is not None and not args.out.strip():
        raise UserError("--out is empty: pass the plan's path (or leave --out out for runs/<model>_...)")
    refuse_level_search_flags(args, cfg)
    out_arg = args.out or cfg.out  # the flag, else the config file's out: key
    out = Path(out_arg) if out_arg else default_out(cfg, args.budget)
    if out.is_dir() or str(out_arg or "").endswith(("/", "\\")):
        out = out / "plan.json"
    searching = cfg.allocator == "optuna" and not cfg.pattern
    default_db = ("optuna.db",) if searching and not cfg.storage else ()  # the storage made beside the plan
    side = [out.with_name(n) for n in SIDE_FILES + (("search_progress.png",) if searching else ()) + default_db]
    # before any work, not after it; an explicit storage may well be the optuna.db beside the plan
    check_command_output(out, "--out", args, cfg, siblings=side)
    # names that are otherwise only parsed inside the work (in an Optuna trial, after the profile)
    allocator_class(cfg.allocator)
    if not cfg.pattern:
        allocator_class(cfg.reference_allocator)
    RepairPipeline.parse(cfg.repair)
    RepairPipeline.parse(cfg.loop_repair)
    made: list[Path] = []
    db: Path | None = None
    if cfg.allocator == "optuna" and not cfg.pattern:  # bad settings or an unreachable server fail before any work
        StudySettings(cfg.n_trials, cfg.timeout, cfg.total_trials)
        heartbeat(cfg)
        if not cfg.storage:
            path = (out.parent / "optuna.db").resolve()
            if cfg.n_trials == 0 and not path.exists():
                raise UserError(
                    f"--n-trials 0 writes the plan from a stored study's best trial, but {path} does "
                    "not exist yet: run with --n-trials > 0 first (or pass --storage)"
                )
            made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]
            out.parent.mkdir(parents=True, exist_ok=True)
            db = None if path.exists() else path  # only a storage this run creates is ever removed
            cfg = cfg.updated(storage=f"sqlite:///{path}")
        else:
            path = storage_file(cfg.storage)
            db = path if path is not None and not path.exists() else None
    try:
        if cfg.allocator == "optuna" and not cfg.pattern:
            check_storage(cfg.storage)
        run_search(cfg, args.budget, out, verify=args.verify)
    except BaseException:  # bad input found later, or Ctrl-C: no empty storage or folder stays behind
        if db is not None:
            discard_if_empty(db, made)
        raise
    return 0


def run_search(cfg: RunConfig, budget: float | None, out: Path, verify: bool = True) -> Plan:
    """The command's flow: progress lines, the search, the files, and the summary tables."""
    t0 = time.perf_counter()
    what = f"pattern {cfg.pattern}" if cfg.pattern else f"budget {budget:g} ({cfg.unit}), allocator {cfg.allocator}"
    print(f"rr_alloc search: {what}, repair {cfg.repair}", flush=True)
    session = Session(cfg, progress=True)
    _print_setting(session)
    dense = _print_dense(session)
    prof = evidence.profile(session) if not cfg.pattern and allocator_class(cfg.allocator).needs.profile else None
    if prof is not None:
        print(
            f"RR profile: {len(prof.layers)} layers x {len(prof.grid)} grid points in "
            f"{session.timings['profile']:.1f}s (cache {prof.meta.get('cache')})",
            flush=True,
        )
    plan, alloc = plan_budget(session, budget, check=verify)
    prof = prof or evidence.profile(session)
    ref_name = "global" if cfg.pattern else cfg.reference_allocator
    table = layer_table(plan, prof, {ref_name: allocate(session, ref_name, plan.budget).counts})
    # every output is computed before any is written, and the side files and the plan (last) move into place
    # together: an error or Ctrl-C while they are written leaves the files of an earlier run as they were
    with staged_folder(out.parent, last=out.name) as staging:
        write_profile_csv(prof, staging / "profile.csv")
        plot_rr_curves(
            prof,
            staging / "rr_curves.png",
            plan.sparsities,
            title=f"{cfg.model}: RR profile, {plan.allocator} plan at {plan.budget:g}",
        )
        if plan.search and alloc.study is not None:
            plot_search_progress(
                alloc.study.get_trials(deepcopy=False),
                plan.search.get("anchor_selection"),
                staging / "search_progress.png",
                f"{cfg.model}: {plan.search['optimizer']} at {plan.budget:g}",
                plan.search.get("anchor", "global"),
            )
        extra = [out.with_name(f.name) for f in sorted(staging.iterdir())]
        plan.save(staging / out.name, folder=out.parent)
    outputs_in_place()
    print()
    print(table.to_string(index=False))
    target = "N:M pattern" if cfg.pattern else f"target {budget:.4f}"
    print(f"\nachieved global sparsity: {plan.achieved_sparsity:.4f} ({cfg.unit}; {target})")
    if verify:
        _print_verification(plan, dense, cfg.repair, session.splits.calib.n)
    for lines in (search_lines(plan.search), rule_choice_lines(plan.rule_choice)):  # empty when not run
        if lines:
            print("\n" + "\n".join(lines))
    print(
        f"\nwrote {out} (plan), {', '.join(p.name for p in extra)} in {out.parent}  [{time.perf_counter() - t0:.1f}s]"
    )
    if cfg.allocator == "optuna" and not cfg.pattern:
        print("\n".join(summary_lines(cfg.storage, cfg.objective)))
    if cfg.model == "digits_resnet":
        print("\n" + EMBEDDED_NOTE)
    return plan


def plan_label(plan: Plan) -> str:
    """The plan's allocator as the tables name it: ``best-rule (lamp)`` for a rule chosen by measurement."""
    chosen = plan.rule_choice.get("chosen")
    return f"{plan.allocator} ({chosen})" if chosen else plan.allocator


def _print_dense(session: Session) -> Metrics:
    """The dense model's test metrics, and its top-1 when the test images are labelled."""
    dense = session.dense_metrics("test")
    if dense.top1 is not None:
        print(f"dense top-1 on test: {100 * dense.top1:.2f}%", flush=True)
    else:
        print("test images unlabelled: plans are scored by agreement and KL to the dense model", flush=True)
    return dense


def _print_setting(session: Session) -> None:
    """What the run works on: the model's prunable layers, the device and the splits."""
    n_w = sum(layer.n_weights for layer in session.layers)
    print(f"model {session.cfg.model}: {len(session.layers)} prunable layers, {n_w:,} weights; device {session.device}")
    s = session.splits
    val = f" + validation {s.validation.n}" if s.validation is not None and s.validation.n else ""
    print(
        f"data {s.description}; calibration {s.calib.n} + selection {s.selection.n}{val} "
        f"training images (seed {session.cfg.seed}, disjoint); test {s.test.n} images (reporting only)"
    )


def _print_verification(plan: Plan, dense: Metrics, repair: str, n_calib: int) -> None:
    """The verification table: dense, the plan and its reference, each after the repair."""
    v = plan.verify
    unit = plan.budget_unit
    rows = [
        metrics_row("dense", dense, 0.0, unit),
        metrics_row(
            f"{plan_label(plan)} + repair",
            Metrics(v["top1"], v["agreement"], v["kl"], v["n"]),
            plan.achieved_sparsity,
            unit,
        ),
    ]
    if "reference" in v:
        r = v["reference"]
        rows.append(
            metrics_row(
                f"{r['allocator']} + repair",
                Metrics(r["top1"], r["agreement"], r["kl"], v["n"]),
                r["achieved_sparsity"],
                unit,
            )
        )
    print(f"\nverification: prune -> {repair} on {n_calib} calibration images -> test split ({v['n']} images)")
    print(pd.DataFrame(rows).to_string(index=False))


def cmd_verify(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    cfg = config_for_plan(args, plan)
    check_split_size(cfg, args.split)
    session = session_for_plan(plan, cfg)
    m = verify(session, session.pruning(plan.counts), cfg.repair, splits=(args.split,))[args.split]
    dense = session.dense_metrics(args.split)
    print(f"plan {args.plan}: {plan.allocator} at budget {plan.budget:g}, achieved {plan.achieved_sparsity:.4f}")
    print(f"verification: prune -> {cfg.repair} -> {args.split} split ({m.n} images)")
    unit = plan.budget_unit
    rows = [
        metrics_row("dense", dense, 0.0, unit),
        metrics_row(f"{plan_label(plan)} + repair", m, plan.achieved_sparsity, unit),
    ]
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    print("models:")
    for k, v in list_models().items():
        print(f"  {k:<22} {v}")
    for source in SOURCES.values():
        if source.usage:
            print(f"  {source.usage}")
    print("allocators:")
    for k, cls in ALLOCATORS.items():
        print(f"  {k:<22} {cls.description}")
    print("repair pipelines (steps joined by '>'):")
    width = max(map(len, PRESETS)) + 2
    for k, v in PRESETS.items():
        print(f"  {k:<{width}}{v}")
    print("repair steps:")
    for kind in step_kinds():
        print(f"  {kind.grammar}")
    return 0
