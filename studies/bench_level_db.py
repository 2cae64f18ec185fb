"""Benchmark: the level database and its stitched candidates on EfficientNet-Lite, calibrated on ImageNet photos.

One session (``edge_allocation``'s splits: 128 calibration and 128 selection photos from ``pool/``, the
calibration seed), the search repair ``obs>naive@block+logits`` (what the calibration check picks on these
photos), global magnitude at ``--sparsity`` as the anchor:

- ``T_f``: one dense forward over the calibration split (median of ``--repeats``);
- the database build (anchor inputs, the default ladder), once: seconds, levels, megabytes, and its ratio to
  ``T_f``;
- ``--candidates`` random level vectors near the anchor (1-4 unguided moves inside the budget band), each
  scored twice on the whole selection split: stitched (``StitchedScorer``, no stages) and in full (pruned at
  the same counts and repaired by the whole sequential pipeline, ``SelectionScorer``); the ratio of their
  seconds and how well the stitched score ranks the full one (Spearman rho, mean absolute KL error).

Every time is measured in this one run, so the ratios hold on a shared machine.

    python studies/bench_level_db.py                      # Lite1 at 0.7, writes studies/results/bench_level_db/
    python studies/bench_level_db.py --model lite2          # on a GPU the session takes it (device auto)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from bench_profile import dense_pass, median_time
from common import ROOT, machine, run_main, write_report
from level_search import candidates

from rr_alloc.api import allocate
from rr_alloc.evaluation import kept_copies
from rr_alloc.search.databases import level_database
from rr_alloc.search.scoring import SelectionScorer
from rr_alloc.search.stitched import StitchedScorer
from rr_alloc.system.files import write_text_atomic

sys.path.insert(0, str(Path(__file__).parent))
from edge_allocation import TRANSFORMS, session_for  # noqa: E402

OUT = ROOT / "studies" / "results" / "bench_level_db"
PIPELINE = "obs-nobn"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", help="path to shared/ (default $RR_ALLOC_SHARED or ../shared)")
    p.add_argument("--model", default="lite1", choices=list(TRANSFORMS))
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="repeats of the dense forward")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    from scipy import stats

    session_args = argparse.Namespace(shared=args.shared, calib=128, selection=128, fidelity=16, trials=0, out=args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    session = session_for(session_args, args.model, args.seed, PIPELINE)
    repair = session.cfg.loop_repair
    anchor = allocate(session, "global", args.sparsity).counts
    t_f = median_time(lambda: dense_pass(session.dense, session.splits.calib), args.repeats)
    t0 = time.perf_counter()
    db = level_database(session, anchor, "anchor")
    t_db = time.perf_counter() - t0
    stitched = StitchedScorer(session, repair, db, session.cfg.objective, stages=())
    full = SelectionScorer(session, repair, session.cfg.objective)
    names = [layer.name for layer in session.layers]
    rows = []
    for lv in candidates(session, db, args.sparsity, args.candidates, args.seed):
        counts = {name: int(db.counts[name][v]) for name, v in zip(names, lv)}
        t0 = time.perf_counter()
        s = stitched.score_levels(stitched.all_levels({n: db.level_of(n, counts[n]) for n in names})).full
        t_s = time.perf_counter() - t0
        kept_copies(session).clear()  # a new candidate: repaired in full, never from a kept copy
        t0 = time.perf_counter()
        f = full(counts)
        t_full = time.perf_counter() - t0
        rows.append({"stitched": s, "full": f, "stitched_s": t_s, "full_s": t_full})
        print(f"candidate {len(rows)}: stitched KL {s:.4f} ({t_s:.1f} s), full KL {f:.4f} ({t_full:.1f} s)", flush=True)
    st, fu = (np.array([r[k] for r in rows]) for k in ("stitched", "full"))
    ts, tf = (float(np.median([r[k] for r in rows])) for k in ("stitched_s", "full_s"))
    rho = float(stats.spearmanr(st, fu).statistic) if len(rows) > 2 else float("nan")
    m = db.meta
    result = {
        "model": args.model,
        "sparsity": args.sparsity,
        "seed": args.seed,
        "device": str(session.device),
        "repair": repair,
        "dense_forward_s": t_f,
        "database_s": t_db,
        "database_over_forward": t_db / t_f,
        "levels": m["levels"],
        "megabytes": m["megabytes"],
        "candidates": rows,
        "stitched_s": ts,
        "full_s": tf,
        "full_over_stitched": tf / ts,
        "spearman": rho,
        "mean_abs_error": float(np.abs(st - fu).mean()),
    }
    lines = [
        f"# Level database on EfficientNet-{args.model.capitalize()} ({args.sparsity} sparsity, photos)",
        "",
        f"`python studies/bench_level_db.py --model {args.model} --sparsity {args.sparsity}` "
        f"on {machine()} (device {session.device}). 128 calibration and 128 selection photos (seed {args.seed}); "
        f"search repair `{repair}`; anchor: global magnitude.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| dense forward over the calibration split (T_f) | {t_f:.1f} s |",
        f"| database build (anchor inputs) | {t_db:.0f} s = **{t_db / t_f:.0f} T_f** |",
        f"| levels / size | {m['levels']} / {m['megabytes']:.1f} MB |",
        f"| stitched candidate, whole selection split (median of {len(rows)}) | {ts:.1f} s |",
        f"| full candidate (prune + whole pipeline + selection) | {tf:.1f} s |",
        f"| full / stitched | **{tf / ts:.1f}x** |",
        f"| stitched against full KL: Spearman rho / mean abs error | {rho:.2f} / {result['mean_abs_error']:.4f} |",
        "",
        "Every time in this table comes from the one run above (the ratios hold on a shared machine).",
    ]
    stem = args.out / f"bench_level_db_{args.model}_{session.device.type}"
    write_text_atomic(stem.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    write_report(stem.with_suffix(".md"), lines)


if __name__ == "__main__":
    run_main(main)
