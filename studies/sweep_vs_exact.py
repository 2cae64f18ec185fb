"""Is the cheap re-fit (``obs:solve=sweep``: SparseGPT's sweep, then conjugate gradients on the kept weights)
within noise of the exact per-row re-fit (``obs:solve=exact``)?

On CIFAR ResNets every layer is below the exact-solve budget, so both run on every layer: global-magnitude
counts at the budget, ``obs:solve=S>bn>naive@block+logits`` on the calibration split, scored on the
selection split (KL to the dense logits; the choice-making split) and on the test split (reporting only),
paired by calibration seed. Times are the repair alone. Results: ``studies/results/sweep_vs_exact/``.

    python studies/sweep_vs_exact.py                 # ResNet-20 and ResNet-32 at 0.9, seeds 0 1 2
    python studies/sweep_vs_exact.py --quick         # smoke run, separate output folder
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
from common import ROOT, add_common_args, machine, model_config, run_main, shared_dir, t_interval

from rr_alloc.api import allocate
from rr_alloc.evaluation import repaired_model
from rr_alloc.nn.metrics import compare_logits, logits_of
from rr_alloc.plans.report import write_frame_csv
from rr_alloc.session import Session
from rr_alloc.system.files import write_text_atomic

TAIL = ">bn>naive@block+logits"


def run(args: argparse.Namespace, out: Path) -> pd.DataFrame:
    rows = []
    overrides = {"calib_size": 256, "selection_size": 256, "eval_size": 1000} if args.quick else {}
    for model in args.models:
        for seed in args.seeds:
            session = Session(model_config(model, seed=seed, **overrides), progress=False)
            counts = allocate(session, "global", args.budget).counts
            for solve in ("exact", "sweep"):
                repair = f"obs:solve={solve}{TAIL}"
                t0 = time.perf_counter()
                pruned, _ = repaired_model(session, counts, repair)
                seconds = time.perf_counter() - t0
                ms = {}
                for split in ("selection", "test"):
                    dense, labels = session.dense_logits(split)
                    ms[split] = compare_logits(
                        logits_of(pruned, session.split(split), session.device)[0], labels, dense
                    )
                rows.append(
                    {
                        "model": model,
                        "seed": seed,
                        "budget": args.budget,
                        "solve": solve,
                        "selection_kl": ms["selection"].kl,
                        "selection_top1": ms["selection"].top1,
                        "test_top1": ms["test"].top1,
                        "test_n": ms["test"].n,
                        "repair_seconds": seconds,
                    }
                )
                print(
                    f"{model} seed {seed} {solve:<5} selection KL {ms['selection'].kl:.4f} "
                    f"test top-1 {100 * ms['test'].top1:.2f}  ({seconds:.1f}s)",
                    flush=True,
                )
                write_frame_csv(pd.DataFrame(rows), out / "results.csv")
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame, args: argparse.Namespace, seconds: float) -> str:
    lines = [
        "# The sweep (SparseGPT's, then conjugate gradients) against the exact re-fit"
        + (" (QUICK SMOKE RUN: not a result)" if args.quick else ""),
        "",
        f"Command: `python {' '.join(['studies/sweep_vs_exact.py', *sys.argv[1:]])}`  ",
        f"Machine: {machine()}; {seconds / 60:.1f} min.",
        "",
        f"Global-magnitude counts at {args.budget}, `obs:solve=S{TAIL}`, paired by calibration seed "
        f"({', '.join(map(str, args.seeds))}); sweep minus exact, mean ± 95% t half-width.",
        "",
        "| model | selection KL, exact | sweep - exact | test top-1 %, exact | sweep - exact (points) "
        "| repair s, exact | sweep |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, g in df.groupby("model", sort=False):
        p = g.pivot_table(index="seed", columns="solve", values=["selection_kl", "test_top1", "repair_seconds"])
        kl_d = t_interval((p["selection_kl"]["sweep"] - p["selection_kl"]["exact"]).values)
        top_d = t_interval(100 * (p["test_top1"]["sweep"] - p["test_top1"]["exact"]).values)
        lines.append(
            f"| {model} | {p['selection_kl']['exact'].mean():.4f} | {kl_d[0]:+.4f} ± {kl_d[1]:.4f} | "
            f"{100 * p['test_top1']['exact'].mean():.2f} | {top_d[0]:+.2f} ± {top_d[1]:.2f} | "
            f"{p['repair_seconds']['exact'].mean():.1f} | {p['repair_seconds']['sweep'].mean():.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=float, default=0.9)
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "sweep_vs_exact"))
    args = ap.parse_args()
    shared_dir(args.shared)
    out = Path(args.out)
    if args.quick:
        args.models, args.seeds = args.models[:1], [0, 1]
        out = out.with_name(out.name + "_quick")
    t0 = time.perf_counter()
    df = run(args, out)
    text = summarise(df, args, time.perf_counter() - t0)
    write_text_atomic(out / "summary.md", text)
    print(text)


if __name__ == "__main__":
    run_main(main)
