"""Does the reconstruction's damping need to follow the number of calibration images? A check on CIFAR.

On EfficientNet-Lite with 128 photos ten times the default damping (``obs:damp=0.1``) gained about 8 agreement
points under LAMP and ERK (``studies/edge_allocation.py``), while on the CIFAR ResNets with 1024 images
``damp=0.01`` won the damping screen (``studies/repair_ablation.py --reconstruct``). Two readings: the damping
should grow as the calibration set shrinks (then CIFAR at 128 images wants more damping too), or only the
layers that see fewer sample rows than they have inputs need it (Lite's 1280-input classifier on 128 photos;
``damp=auto``, the default, raises exactly those, and no CIFAR layer is among them).

Here: CIFAR ResNet-20 and ResNet-32 at 0.9 (global magnitude and LAMP), calibration 128 or 1024 images,
``obs:damp=X>bn>naive@block+logits`` for X in 0.01 and 0.1 (``damp=auto`` equals 0.01 on these models: no layer
sees fewer rows than inputs). Selection KL (the split a choice would use) and test top-1 (reporting), 3
calibration seeds; paired differences with 95% t intervals over seeds.

    python studies/damping_check.py                 # both models, 3 seeds (about 10 minutes on 2 cores)
    python studies/damping_check.py --summarise     # the table from damping_check.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from common import ROOT, add_common_args, machine, model_config, run_main, t_interval, write_report

from rr_alloc.api import allocate, verify
from rr_alloc.plans.report import write_frame_csv
from rr_alloc.session import Session

DAMPS = ("0.01", "0.1")
RULES = ("global", "lamp")
CALIB = (128, 1024)
KEY = ["model", "calib", "seed", "rule", "damp"]


def run(args: argparse.Namespace, out: Path) -> pd.DataFrame:
    path = out / "damping_check.csv"
    rows = pd.read_csv(path).to_dict("records") if path.exists() else []
    done = {tuple(r[k] for k in KEY) for r in rows}
    for model in args.models:
        for calib in CALIB:
            for seed in args.seeds:
                todo = [(r, d) for r in RULES for d in DAMPS if (model, calib, seed, r, float(d)) not in done]
                if not todo:
                    continue
                overrides = {"calib_size": calib, "seed": seed, "cache": False}
                session = Session(model_config(model, **overrides), progress=False)
                for rule, damp in todo:
                    counts = allocate(session, rule, args.budget).counts
                    t0 = time.perf_counter()
                    ms = verify(session, counts, f"obs:damp={damp}>bn>naive@block+logits", ("selection", "test"))
                    row = {
                        "model": model,
                        "calib": calib,
                        "seed": seed,
                        "rule": rule,
                        "damp": float(damp),
                        "selection_kl": ms["selection"].kl,
                        "selection_agreement": ms["selection"].agreement,
                        "test_top1": ms["test"].top1,
                        "test_n": ms["test"].n,
                        "seconds": time.perf_counter() - t0,
                    }
                    rows.append(row)
                    write_frame_csv(pd.DataFrame(rows), path)
                    print(
                        f"{model} calib {calib} seed {seed} {rule:<6} damp {damp:<4} selection KL "
                        f"{row['selection_kl']:.3f} test top-1 {100 * row['test_top1']:.2f}",
                        flush=True,
                    )
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame, out: Path, argv: str) -> None:
    lines = [
        "# Damping against the number of calibration images (CIFAR ResNets at 0.9)",
        "",
        f"Machine: {machine()}. `obs:damp=X>bn>naive@block+logits`; selection: 1024 training images; test: "
        f"{int(df.test_n.iloc[0])} CIFAR-10 test images. Mean over calibration seeds ± 95% t half-width; "
        "`0.1 − 0.01` paired over seeds (selection KL: negative favours 0.1; top-1: positive favours 0.1).",
        "",
        "| model | calib | rule | seeds | top-1 % at 0.01 | top-1 % at 0.1 | top-1 0.1 − 0.01 | sel. KL 0.1 − 0.01 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, calib, rule), g in df.groupby(["model", "calib", "rule"], sort=True):
        a = g[g.damp == 0.01].set_index("seed")
        b = g[g.damp == 0.1].set_index("seed")
        seeds = sorted(set(a.index) & set(b.index))
        if not seeds:
            continue
        a, b = a.loc[seeds], b.loc[seeds]

        def ci(v, scale=100.0, digits=2):
            m, h, _ = t_interval(v)
            return f"{scale * m:+.{digits}f}" + ("" if h != h else f" ± {scale * h:.{digits}f}")

        def mean(v):
            m, h, _ = t_interval(v)
            return f"{100 * m:.2f}" + ("" if h != h else f" ± {100 * h:.2f}")

        lines.append(
            f"| {model} | {calib} | {rule} | {len(seeds)} | {mean(a.test_top1)} | {mean(b.test_top1)} | "
            f"{ci(b.test_top1.values - a.test_top1.values)} | "
            f"{ci(b.selection_kl.values - a.selection_kl.values, 1.0, 3)} |"
        )
    lines += ["", f"    python studies/damping_check.py {argv}".rstrip()]
    write_report(out / "damping_check.md", lines)


def main() -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=0.9)
    p.add_argument("--summarise", action="store_true", help="rebuild damping_check.md from the CSV")
    p.add_argument("--out", type=Path, default=ROOT / "studies" / "results" / "damping_check")
    args = p.parse_args()
    if args.quick:
        args.models, args.seeds = args.models[:1], [0]
        args.out = args.out.parent / "damping_check_quick"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "damping_check.csv"
    df = pd.read_csv(path) if args.summarise and path.exists() else run(args, args.out)
    summarise(df, args.out, " ".join(a for a in sys.argv[1:] if a != "--summarise"))


if __name__ == "__main__":
    run_main(main)
