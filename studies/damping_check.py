"""Does the reconstruction's damping need to follow the number of calibration images? A check on CIFAR.

On EfficientNet-Lite with 128 photos ten times the CIFAR damping (``obs:damp=0.1``) gained about 8 agreement
points under LAMP and ERK (``studies/edge_allocation.py``), while on the CIFAR ResNets with 1024 images
``damp=0.01`` won the damping screen (``studies/repair_ablation.py --reconstruct``). If the damping should grow
as the calibration set shrinks, CIFAR on 128 images wants more damping too. ``damp=auto``, the default, is
0.01 from 1024 images on and ``0.01 * 1024 / images`` below (0.08 on 128).

Here: CIFAR ResNet-20 and ResNet-32 at 0.9 (global magnitude and LAMP), calibration 128 or 1024 images,
``obs:damp=X>bn>naive@block+logits`` for X in 0.01, 0.1 and ``auto``. Selection KL (the split a choice would
use) and test top-1 (reporting), 3 calibration seeds; paired differences with 95% t intervals over seeds.

    python studies/damping_check.py                 # both models, 3 seeds (about 10 minutes on 2 cores)
    python studies/damping_check.py --summarise     # the table from damping_check.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from common import ROOT, add_common_args, ci_text, machine, model_config, run_main, write_report

from rr_alloc.api import allocate, verify
from rr_alloc.plans.report import write_frame_csv
from rr_alloc.session import Session

DAMPS = ("0.01", "0.1", "auto")
RULES = ("global", "lamp")
CALIB = (128, 1024)
KEY = ["model", "calib", "seed", "rule", "damp"]


def run(args: argparse.Namespace, out: Path) -> pd.DataFrame:
    path = out / "damping_check.csv"
    rows = _read(path).to_dict("records") if path.exists() else []
    done = {tuple(r[k] for k in KEY) for r in rows}
    for model in args.models:
        for calib in CALIB:
            for seed in args.seeds:
                todo = [(r, d) for r in RULES for d in DAMPS if (model, calib, seed, r, d) not in done]
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
                        "damp": damp,
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


def _read(path: Path) -> pd.DataFrame:
    """The CSV with ``damp`` as the grammar writes it (``0.01``, ``0.1``, ``auto``)."""
    return pd.read_csv(path, dtype={"damp": str})


def summarise(df: pd.DataFrame, out: Path, argv: str) -> None:
    lines = [
        "# Damping against the number of calibration images (CIFAR ResNets at 0.9)",
        "",
        f"Machine: {machine()}. `obs:damp=X>bn>naive@block+logits`; selection: 1024 training images; test: "
        f"{int(df.test_n.iloc[0])} CIFAR-10 test images. Test top-1 %, mean over calibration seeds ± 95% t "
        "half-width; differences to `damp=0.01` paired over seeds (top-1: positive is better; selection KL: "
        "negative is better).",
        "",
        "| model | calib | rule | seeds | 0.01 | 0.1 | auto | 0.1 − 0.01 | auto − 0.01 | sel. KL 0.1 − 0.01 "
        "| sel. KL auto − 0.01 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, calib, rule), g in df.groupby(["model", "calib", "rule"], sort=True):
        by = {d: g[g.damp == d].set_index("seed") for d in DAMPS}
        seeds = sorted(set.intersection(*(set(v.index) for v in by.values())))
        if not seeds:
            continue
        t = {d: by[d].loc[seeds].test_top1.to_numpy() for d in DAMPS}
        k = {d: by[d].loc[seeds].selection_kl.to_numpy() for d in DAMPS}
        lines.append(
            f"| {model} | {calib} | {rule} | {len(seeds)} | {ci_text(t['0.01'], 100)} | {ci_text(t['0.1'], 100)} | "
            f"{ci_text(t['auto'], 100)} | {ci_text(t['0.1'] - t['0.01'], 100, 2, True)} | "
            f"{ci_text(t['auto'] - t['0.01'], 100, 2, True)} | "
            f"{ci_text(k['0.1'] - k['0.01'], 1, 3, True)} | {ci_text(k['auto'] - k['0.01'], 1, 3, True)} |"
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
    df = _read(path) if args.summarise and path.exists() else run(args, args.out)
    summarise(df, args.out, " ".join(a for a in sys.argv[1:] if a != "--summarise"))


if __name__ == "__main__":
    run_main(main)
