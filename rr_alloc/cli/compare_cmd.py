"""``compare``: every allocator x budget (x repair) verified with the same pipeline, one table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import pandas as pd

from ..allocators import ALLOCATORS, allocator_class
from ..api import allocate, verify
from ..config.run_config import RunConfig
from ..errors import UserError
from ..plans.report import rule_choice_lines, save_figure, search_lines, write_frame_csv
from ..repair import RepairPipeline
from ..session import Session
from ..system.files import staged_folder
from .flags import (
    SCORED_SPLITS,
    add_run_flags,
    budget_parser,
    check_split_size,
    config_from_args,
    file_config,
    refuse_search_flags,
)
from .outputs import check_command_output, outputs_in_place

__all__ = ["register", "compare_figure"]


def register(sub: Any) -> None:  # argparse's subparsers object (its class is not public)
    c = sub.add_parser(
        "compare",
        help="allocate several budgets with several allocators, verify all, one table",
        description="Profile once, allocate each budget with each allocator, verify every plan "
        "with the same repair pipeline(s), print one table and write CSV + figure.",
    )
    c.add_argument(
        "--budgets", type=budget_parser("--budgets"), nargs="+", required=True, help="global sparsities in (0, 1)"
    )
    c.add_argument(
        "--allocators",
        nargs="+",
        help="allocators (default: every rule, not best-rule or optuna; name best-rule to include the rule "
        "chosen on the selection split, optuna the end-to-end search with the run's --optimizer, --n-trials and "
        "--validation-size)",
    )
    c.add_argument("--repairs", nargs="+", help="repair pipelines to verify with (default: the run's --repair)")
    c.add_argument(
        "--split",
        choices=SCORED_SPLITS,
        default="test",
        help="split to report on (test: reporting only; selection: for making choices)",
    )
    c.add_argument("--out-dir", help="folder for compare.csv and compare.png (default runs/compare_<model>)")
    add_run_flags(c)
    c.set_defaults(handler=cmd_compare)


def _checked_inputs(args: argparse.Namespace) -> tuple[RunConfig, list[str], list[str]]:
    """The run config, allocators and repairs of a compare run, every bad or ignored input refused first."""
    keys = file_config(args)
    for flag, instead in (
        ("pattern", "compare allocates budgets: drop --pattern, or run search --pattern N:M"),
        ("allocator", "pass --allocators A B ..."),
        ("reference", "every allocator of --allocators is verified side by side"),
        ("out", "compare writes to --out-dir"),
    ):
        if flag in keys:
            raise UserError(f"config key {flag!r} does not apply to compare: {instead}")
        if flag != "out" and getattr(args, flag, None) is not None:
            raise UserError(f"--{flag} does not apply to compare: {instead}")
    if args.repair is not None and args.repairs:
        raise UserError("--repair is the default of --repairs, which is given too: list every pipeline in --repairs")
    cfg = config_from_args(args)
    allocators = args.allocators or [a for a in ALLOCATORS if not ALLOCATORS[a].needs.evaluate]
    for a in allocators:
        allocator_class(a)
    repairs = args.repairs or [cfg.repair]
    for r in repairs:
        RepairPipeline.parse(r, flag="--repairs")
    if args.repairs and not cfg.search_repair:  # best-rule and the search score under a pipeline this run verifies
        cfg = cfg.updated(search_repair=repairs[0])
    for flag, values in (("--budgets", args.budgets), ("--allocators", allocators), ("--repairs", repairs)):
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise UserError(f"{flag} lists {twice} twice: pass each value once")
    check_split_size(cfg, args.split)
    refuse_search_flags(args, allocators)
    scored = next((a for a in allocators if ALLOCATORS[a].needs.evaluate), None)
    if scored and cfg.selection_size == 0:
        raise UserError(
            f"--allocators {scored} scores plans on the selection split, but --selection-size is 0: raise it, or "
            f"drop {scored} from --allocators"
        )
    return cfg, allocators, repairs


def cmd_compare(args: argparse.Namespace) -> int:
    cfg, allocators, repairs = _checked_inputs(args)
    out_dir = Path(args.out_dir or Path("runs") / f"compare_{cfg.model.replace(':', '_')}")
    check_command_output(out_dir, "--out-dir", args, cfg, is_dir=True)  # before any work, not after it
    for name in ("compare.csv", "compare_layers.csv", "compare.png"):
        check_command_output(out_dir / name, "--out-dir", args, cfg)
    session = Session(cfg, progress=True)
    print(
        f"compare: {cfg.model}, budgets {args.budgets}, allocators {allocators}, repairs {repairs}, "
        f"split {args.split} ({session.split(args.split).n} images)",
        flush=True,
    )
    rows, per_layer = _measure(session, args, allocators, repairs)
    df = pd.DataFrame(rows)
    fig = compare_figure(df, pd.DataFrame(per_layer), cfg.model, [layer.name for layer in session.layers])
    # the three files move into place together: an interrupt while they are written leaves the earlier ones
    with staged_folder(out_dir, last="compare.csv") as staging:
        write_frame_csv(pd.DataFrame(per_layer), staging / "compare_layers.csv")
        save_figure(fig, staging / "compare.png")
        write_frame_csv(df, staging / "compare.csv")
    outputs_in_place()
    show = df.assign(
        top1=(100 * df.top1.astype(float)).round(2),
        agreement=(100 * df.agreement).round(2),
        kl=df.kl.round(4),
        achieved_sparsity=df.achieved_sparsity.round(4),
    )
    print()
    print(
        show[["budget", "allocator", "repair", "top1", "agreement", "kl", "achieved_sparsity"]].to_string(index=False)
    )
    print(f"\nwrote {out_dir / 'compare.csv'}, compare_layers.csv, compare.png")
    return 0


def _measure(
    session: Session, args: argparse.Namespace, allocators: list[str], repairs: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (budget, allocator) plan verified with every repair: the result rows and the per-layer rows."""
    cfg = session.cfg
    rows, per_layer = [], []
    for b in args.budgets:
        for a in allocators:
            t0 = time.perf_counter()
            alloc = allocate(session, a, b)
            counts = alloc.counts
            achieved = session.achieved(counts)
            for l in session.layers:
                per_layer.append(
                    {"budget": b, "allocator": a, "layer": l.name, "sparsity": counts[l.name] / l.n_weights}
                )
            search = alloc.search.to_dict() if alloc.search is not None else {}
            if search:
                print("  " + "\n  ".join(search_lines(search)), flush=True)
            if alloc.choice is not None:
                print("  " + "\n  ".join(rule_choice_lines(alloc.choice.to_dict())), flush=True)
            for r in repairs:
                m = verify(session, counts, r, splits=(args.split,))[args.split]
                rows.append(
                    {
                        "budget": b,
                        "allocator": a,
                        "repair": r,
                        "top1": m.top1,
                        "agreement": m.agreement,
                        "kl": m.kl,
                        "achieved_sparsity": achieved,
                        "unit": cfg.unit,
                        "split": args.split,
                        "n": m.n,
                        "seconds": round(time.perf_counter() - t0, 2),
                        "search_fallback": search.get("fallback") if search else None,
                    }
                )
                print(
                    f"  budget {b:g} {a:<10} {r:<24} "
                    + (f"top1 {100 * m.top1:5.1f}  " if m.top1 is not None else "")
                    + "agreement "
                    f"{100 * m.agreement:5.1f}  kl {m.kl:.3f}",
                    flush=True,
                )
    return rows, per_layer


def compare_figure(df: pd.DataFrame, layers: pd.DataFrame, model: str, order: list[str]):
    """Left: top-1 vs budget per allocator (one line style per repair). Right: per-layer sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8))
    metric = "top1" if df.top1.notna().all() else "agreement"  # unlabelled images: agreement with the dense model
    styles = ["-o", "--s", ":^", "-.d"]
    for j, (rep, g) in enumerate(df.groupby("repair", sort=False)):
        for a, ga in g.groupby("allocator", sort=False):
            ax1.plot(ga.budget, 100 * ga[metric].astype(float), styles[j % 4], label=f"{a} | {rep}", ms=4)
    ax1.set(xlabel="global sparsity budget", ylabel=f"{metric} (%) on {df.split.iloc[0]}", title=model)
    ax1.legend(fontsize=7)
    b = sorted(layers.budget.unique())[len(layers.budget.unique()) // 2]
    sub = layers[layers.budget == b]
    x = range(len(order))
    for a, ga in sub.groupby("allocator", sort=False):
        ax2.plot(x, ga.set_index("layer").loc[order, "sparsity"].values, "-o", ms=3, label=a)
    ax2.set_xticks(list(x), order, rotation=90, fontsize=6)
    ax2.set(ylabel="layer sparsity", title=f"per-layer sparsity at budget {b:g}")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig
