"""Which allocator gives the best plan, under the same repair?

CIFAR ResNet-20/32 (``shared/`` weights and data), budgets 0.8/0.9/0.95, every
allocator, verified under BN recalibration only and under the default repair
pipeline, 3 calibration seeds. Each plan is repaired once and evaluated on
both the *selection* split (training images: the evidence that picks
``search``'s default allocator) and the *test* split (reporting only, with 95%
t-intervals over seeds). Optuna runs at budget 0.9 only (time budget), 16
trials per calibration seed, with the default repair and the label-free KL
objective on the selection split.

    python studies/allocation_comparison.py               # full study (~70 min on 2 cores)
    python studies/allocation_comparison.py --quick       # smoke run, separate output folder
    # or one model per process, then one summary:
    python studies/allocation_comparison.py --models resnet32 --tag resnet32
    python studies/allocation_comparison.py --models resnet20 --tag resnet20
    python studies/allocation_comparison.py --merge studies/results/allocation_comparison/results_resnet{32,20}.csv

Outputs (studies/results/allocation_comparison/): results.csv, summary.md, allocation_comparison.png.

The end-to-end search (optimiser x RR guidance, then the winner across models and budgets) is
``--search``; see studies/allocation_search.py for what it runs and writes:

    python studies/allocation_comparison.py --search
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import ROOT, UserError, add_common_args, machine, model_config, run_main, shared_dir, t_interval

from rr_alloc.api import allocate, verify
from rr_alloc.plans.report import save_figure, write_frame_csv
from rr_alloc.repair import CHANNEL_REPAIR as DEFAULT_REPAIR  # the study ran with the channel-wise default
from rr_alloc.session import Session
from rr_alloc.system.files import write_text_atomic

# (label, allocator, layer weights)
ALLOCATORS = [
    ("uniform", "uniform", None),
    ("global", "global", None),
    ("lamp", "lamp", None),
    ("erk", "erk", None),
    ("rr-greedy", "rr-greedy", "uniform"),
    ("rr-exact", "rr-exact", "uniform"),
    ("rr-greedy-sens", "rr-greedy", "sensitivity"),
]
BUDGETS = (0.8, 0.9, 0.95)


def run(
    models, budgets, seeds, repairs, optuna_trials, optuna_seeds, overrides, log, partial: Path | None = None
) -> pd.DataFrame:
    """All (model, seed, budget, allocator, repair) cells; rows are also written to ``partial`` as they come."""
    rows = []
    for model in models:
        for seed in seeds:
            session = Session(
                model_config(model, seed=seed, repair=DEFAULT_REPAIR, n_trials=optuna_trials, **overrides),
                progress=False,
            )
            for b in budgets:
                plans = [(label, alloc, lw) for label, alloc, lw in ALLOCATORS]
                if optuna_trials and abs(b - 0.9) < 1e-9 and seed in optuna_seeds:
                    plans.append(("optuna", "optuna", "uniform"))
                for label, alloc, lw in plans:
                    t0 = time.perf_counter()
                    counts = allocate(session, alloc, b, layer_weights=lw).counts
                    t_alloc = time.perf_counter() - t0
                    for rep in repairs:
                        t1 = time.perf_counter()
                        ms = verify(session, counts, rep, ("selection", "test")).metrics
                        for split, m in ms.items():
                            rows.append(
                                {
                                    "model": model,
                                    "seed": seed,
                                    "budget": b,
                                    "allocator": label,
                                    "repair": rep,
                                    "split": split,
                                    "n": m.n,
                                    "top1": m.top1,
                                    "agreement": m.agreement,
                                    "kl": m.kl,
                                    "achieved_sparsity": session.achieved(counts),
                                    "alloc_seconds": t_alloc,
                                    "verify_seconds": time.perf_counter() - t1,
                                }
                            )
                        if partial is not None:
                            write_frame_csv(pd.DataFrame(rows), partial)
                        log(
                            f"{model} seed {seed} b={b} {label:<15} {rep:<22} selection top1 "
                            f"{100 * ms['selection'].top1:5.1f}  test top1 {100 * ms['test'].top1:5.1f}"
                        )
    return pd.DataFrame(rows)


def rows_from_log(path: str) -> pd.DataFrame:
    """Recover (selection, test) top-1 rows from this script's printed log (for a run stopped early)."""
    import re

    pat = re.compile(
        r"(resnet\d+) seed (\d+) b=([\d.]+) (\S+)\s+(\S+)\s+selection top1\s+([\d.]+)\s+test top1\s+([\d.]+)"
    )
    rows = []
    for m in pat.finditer(Path(path).read_text()):
        model, seed, b, alloc, rep, sel, test = m.groups()
        for split, v, n in (("selection", sel, 1024), ("test", test, 10000)):
            rows.append(
                {
                    "model": model,
                    "seed": int(seed),
                    "budget": float(b),
                    "allocator": alloc,
                    "repair": rep,
                    "split": split,
                    "n": n,
                    "top1": float(v) / 100,
                    "agreement": np.nan,
                    "kl": np.nan,
                }
            )
    return pd.DataFrame(rows)


def _cost_line(df: pd.DataFrame, runtime: float, merged: bool) -> str:
    """Compute time of the cells (from the CSV's per-cell timings), per model."""
    if "verify_seconds" not in df or df.verify_seconds.isna().all():
        return f"Runtime {runtime / 60:.1f} min."
    plan = ["model", "seed", "budget", "allocator"]
    alloc = df.drop_duplicates(plan).groupby("model").alloc_seconds.sum()  # one allocation serves both repairs
    verify = df.drop_duplicates(plan + ["repair"]).groupby("model").verify_seconds.sum()  # one row per split
    per = (alloc + verify) / 60
    what = ", ".join(f"{m} {v:.0f} min" for m, v in per.items())
    return f"Allocation + verification time summed over cells: {what} (profiling and data loading not included)." + (
        "" if merged else f" Wall time of this run: {runtime / 60:.1f} min."
    )


BASELINES = ("uniform", "global", "lamp", "erk")


def goal_check(test: pd.DataFrame) -> list[str]:
    """The target margin, per model/budget/repair: each RR allocator minus the best baseline, paired by seed."""
    rows = []
    for (model, b, rep), t in test.groupby(["model", "budget", "repair"], sort=False):
        top = t.pivot_table(index="seed", columns="allocator", values="top1") * 100
        base = [a for a in BASELINES if a in top]
        best = top[base].mean().idxmax()
        row = {"model": model, "budget": f"{b:g}", "repair": rep, "best baseline": f"{best} {top[best].mean():.1f}"}
        for a in [c for c in top.columns if c not in BASELINES]:
            d = (top[a] - top[best]).dropna()
            if len(d):
                m, h, _ = t_interval(d.values)
                row[a] = f"{m:+.1f} ± {h:.1f}" if not np.isnan(h) else f"{m:+.1f}"
        rows.append(row)
    return [
        "## Goal check: RR-driven allocators minus the best baseline (test top-1 points)",
        "",
        "Per model, budget and repair: the baseline (uniform, global, lamp, erk) with the best mean test "
        "top-1, and each other allocator's difference to it, paired by calibration seed (mean ± 95% "
        "t-interval half-width). The study's goal: >= +3 at 0.9 and never negative beyond noise.",
        "",
        pd.DataFrame(rows).fillna("").to_markdown(index=False),
        "",
    ]


def summarise(df: pd.DataFrame, args, runtime: float, default_allocator: str, sel_rank: pd.DataFrame) -> str:
    test = df[df.split == "test"]
    seeds = sorted(int(s) for s in df.seed.unique())
    lines = [
        f"# Allocation comparison{' (QUICK SMOKE RUN: not a result)' if args.quick else ''}",
        "",
        f"Command: `{' '.join(['python', 'studies/allocation_comparison.py', *sys.argv[1:]])}`  ",
        f"Machine: {machine()}.  ",
        _cost_line(df, runtime, bool(args.merge)),
        "",
        f"Calibration {args.calib} and selection {args.selection} training images per seed (seeds {seeds}); "
        f"test = {int(test.n.iloc[0])} CIFAR-10 JPEG test images, reporting only. Cells: mean test top-1 (%) "
        f"over seeds ± 95% t-interval half-width."
        + (
            f" Optuna: budget 0.9, {args.optuna_trials} trials per calibration seed, default repair, KL to the "
            "dense logits on the selection split."
            if (df.allocator == "optuna").any()
            else ""
        ),
        "",
    ]
    for rep in df.repair.unique():
        lines += [f"## Repair `{rep}`", ""]
        t = test[test.repair == rep]
        cells = {}
        for (model, b, a), g in t.groupby(["model", "budget", "allocator"]):
            m, h, _ = t_interval(100 * g.top1.values)
            cells[(a, f"{model} {b:g}")] = f"{m:.1f} ± {h:.1f}" if not np.isnan(h) else f"{m:.1f}"
        allocs = list(dict.fromkeys(df.allocator))
        cols = list(dict.fromkeys(f"{m} {b:g}" for m in df.model.unique() for b in sorted(df.budget.unique())))
        table = pd.DataFrame([[cells.get((a, c), "") for c in cols] for a in allocs], index=allocs, columns=cols)
        lines += [table.to_markdown(), ""]
    lines += goal_check(test)
    lines += [
        "## Selection split (training images): the evidence for the default allocator",
        "",
        "Mean over models, budgets 0.8/0.9/0.95 and seeds, default repair; optuna (0.9 only) is left out "
        "of this ranking since it ran at one budget.",
        "",
        sel_rank.round(4).to_markdown(),
        "",
        f"**Default allocator chosen from this table: `{default_allocator}`.**",
        "",
    ]
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = df[df.split == "test"]
    models, repairs = list(test.model.unique()), list(test.repair.unique())
    fig, axes = plt.subplots(len(models), len(repairs), figsize=(6 * len(repairs), 4 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, rep in enumerate(repairs):
            ax = axes[i, j]
            for a, g in test[(test.model == model) & (test.repair == rep)].groupby("allocator", sort=False):
                stats = [t_interval(100 * gg.top1.values) for _, gg in g.groupby("budget")]
                bs = sorted(g.budget.unique())
                ax.errorbar(
                    bs,
                    [s[0] for s in stats],
                    yerr=[0 if np.isnan(s[1]) else s[1] for s in stats],
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=a,
                )
            ax.set(title=f"{model} | {rep}", xlabel="global sparsity", ylabel="test top-1 (%)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--optuna-trials", type=int, default=16, help="trials per Optuna search at 0.9 (0: skip)")
    ap.add_argument(
        "--optuna-seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="calibration seeds that get an Optuna search (time budget)",
    )
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    ap.add_argument("--tag", default="", help="suffix of results_<tag>.csv for a partial run (see --merge)")
    ap.add_argument("--merge", nargs="+", help="summarise these results CSVs instead of running")
    ap.add_argument(
        "--merge-log",
        nargs="+",
        default=[],
        help="also recover rows from logs of runs stopped before writing their CSV",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="output folder (default studies/results/allocation_comparison, or allocation_search with --search)",
    )
    s = ap.add_argument_group("end-to-end search (--search)")
    s.add_argument("--search", action="store_true", help="run the search study (studies/allocation_search.py)")
    s.add_argument("--search-trials", type=int, default=150, help="trials (evaluations) per search")
    s.add_argument("--search-trials-b", type=int, default=100, help="trials per search in (B) (the configs' default)")
    s.add_argument("--search-selection", type=int, default=2048, help="selection images that score candidates")
    s.add_argument("--search-validation", type=int, default=2048, help="validation images of the fallback check")
    s.add_argument("--search-selection-c", type=int, default=4096, help="(C): the larger selection split")
    s.add_argument(
        "--search-phases",
        default="AB",
        help="any of A (optimiser x guidance), B (winner elsewhere), C (winner on a larger selection split)",
    )
    s.add_argument(
        "--search-no-transfer",
        action="store_true",
        help="skip verifying the searched plans under the reconstruction repair (about 1 min a cell)",
    )
    s.add_argument(
        "--search-transfer-only",
        metavar="VARIANT",
        help="only verify the finished cells of VARIANT (e.g. evo-rr) under the reconstruction repair",
    )
    s.add_argument("--summarise", action="store_true", help="--search: rebuild the summary from the CSVs")
    args = ap.parse_args()
    shared_dir(args.shared)
    if args.search:
        import allocation_search

        allocation_search.main(args, machine(), " ".join(["python", "studies/allocation_comparison.py", *sys.argv[1:]]))
        return
    args.out = args.out or str(ROOT / "studies" / "results" / "allocation_comparison")
    t0 = time.perf_counter()
    models, budgets, seeds, overrides = args.models, tuple(args.budgets), args.seeds, {}
    args.calib = args.selection = 1024
    out = Path(args.out)
    if args.quick:
        models, budgets, seeds, args.optuna_trials = models[:1], (0.9,), [0, 1], 8
        overrides = {"calib_size": 256, "selection_size": 256, "eval_size": 1000}
        args.calib = args.selection = 256
        out = out.with_name(out.name + "_quick")
    if args.merge:
        missing = [f for f in args.merge + args.merge_log if not Path(f).is_file()]
        if missing:
            raise UserError(f"--merge: no such file {missing[0]}: pass results CSVs written by --tag runs")
        parts = [pd.read_csv(p) for p in args.merge] + [rows_from_log(p) for p in args.merge_log]
        df = pd.concat(parts, ignore_index=True)
    else:
        name = f"results_{args.tag}.csv" if args.tag else "results.csv"
        df = run(
            models,
            budgets,
            seeds,
            ["bn", DEFAULT_REPAIR],
            args.optuna_trials,
            args.optuna_seeds,
            overrides,
            lambda m: print(m, flush=True),
            partial=out / name,
        )
        write_frame_csv(df, out / name)
        if args.tag:
            return
    write_frame_csv(df, out / "results.csv")
    sel = df[(df.split == "selection") & (df.repair == DEFAULT_REPAIR) & (df.allocator != "optuna")]
    metric = "kl" if sel.kl.notna().all() else "top1"  # rows recovered from a log carry top-1 only
    rank = sel.groupby("allocator")[["kl", "agreement", "top1"]].mean().sort_values(metric, ascending=metric == "kl")
    default = rank.index[0]
    plot(df, out / "allocation_comparison.png")
    text = summarise(df, args, time.perf_counter() - t0, default, rank)
    write_text_atomic(out / "summary.md", text)
    print(text)


if __name__ == "__main__":
    run_main(main)
