"""Benchmark: reconstruction repair (lsq / obs) against one dense forward, and its peak memory.

For CIFAR ResNet-20/32, 1024 calibration images (pre-decoded tensors, decoding
excluded), global magnitude at 0.9, the given thread count:

- ``T_f``    dense forward over the calibration set;
- ``T_lsq``  ``reconstruct`` with ``lsq`` on a magnitude-pruned copy: Gram accumulation,
  batched solves and the lockstep propagation of dense and pruned activations;
- ``T_obs``  the same with ``obs`` (SparseGPT sweep, then the exact re-fit);
- ``T_prof`` the RR profile with ``--profile-repair lsq`` over the channel-wise profile.

Each time is the median of ``--repeats`` runs; the ratios are computed within one run.
A breakdown (cProfile, one lsq run) shows where the time goes. Peak resident memory
is measured in fresh processes (high-water mark reset right before the reconstruction).

    python studies/bench_reconstruct.py        # writes studies/results/bench_reconstruct/
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import pstats
import sys
from pathlib import Path

import torch
from bench_profile import GRID, dense_pass, median_time
from common import ROOT, machine, model_config, peak_rss_mb, run_main, shared_dir

from rr_alloc.api import allocate
from rr_alloc.data.splits import Batches
from rr_alloc.nn.layers import prunable_layers
from rr_alloc.nn.pruning import Pruning, apply_masks
from rr_alloc.profiling.rr import profile_rr
from rr_alloc.repair.reconstruct import ReconstructStep, reconstruct
from rr_alloc.session import Session
from rr_alloc.system.files import write_text_atomic


def setup(model_name: str, batch_size: int) -> tuple[Session, Batches, dict]:
    session = Session(
        model_config(model_name, batch_size=batch_size, selection_size=0, eval_size=16, cache=False), progress=False
    )
    return (
        session,
        Batches(session.splits.calib.x, session.splits.calib.y, batch_size),
        Pruning(counts=allocate(session, "global", 0.9).counts).keep_masks(session.dense),
    )


def run_reconstruct(session: Session, batches: Batches, masks: dict, method: str) -> None:
    pruned = copy.deepcopy(session.dense)
    apply_masks(pruned, masks)
    layers = [n for n, m in pruned.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    reconstruct(pruned, session.dense, batches, layers, ReconstructStep(method), masks=masks)


def breakdown(session: Session, batches: Batches, masks: dict) -> str:
    pr = cProfile.Profile()
    pr.enable()
    run_reconstruct(session, batches, masks, "lsq")
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(10)
    lines = [l for l in s.getvalue().splitlines() if l.strip()]
    start = next(i for i, l in enumerate(lines) if "ncalls" in l)
    return "\n".join(lines[start : start + 11])


def peak_memory(model_name: str, calib: int, method: str) -> tuple[float, float]:
    """(peak RSS during the reconstruction, RSS just before it), MB, in a fresh process."""
    setup = (
        f"from bench_reconstruct import setup, run_reconstruct\nsession, batches, masks = setup({model_name!r}, 256)\n"
    )
    return peak_rss_mb(setup, f"run_reconstruct(session, batches, masks, {method!r})\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet32"])
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "bench_reconstruct"))
    args = ap.parse_args()
    shared_dir(args.shared)
    torch.set_num_threads(args.threads)
    rows, notes = [], []
    for name in args.models:
        session, batches, masks = setup(name, args.batch_size)
        t_f = median_time(lambda: dense_pass(session.dense, batches), args.repeats)
        t_lsq = median_time(lambda: run_reconstruct(session, batches, masks, "lsq"), args.repeats)
        t_obs = median_time(lambda: run_reconstruct(session, batches, masks, "obs"), args.repeats)
        layers = prunable_layers(session.dense)
        t_pc = median_time(lambda: profile_rr(session.dense, batches, GRID, layers), args.repeats)
        t_pl = median_time(lambda: profile_rr(session.dense, batches, GRID, layers, profile_repair="lsq"), args.repeats)
        row = {
            "model": name,
            "images": batches.n,
            "threads": torch.get_num_threads(),
            "T_f": t_f,
            "T_lsq": t_lsq,
            "T_obs": t_obs,
            "lsq_over_forward": t_lsq / t_f,
            "obs_over_forward": t_obs / t_f,
            "T_profile_channel": t_pc,
            "T_profile_lsq": t_pl,
            "profile_lsq_over_channel": t_pl / t_pc,
        }
        if not args.no_memory:
            for method in ("lsq", "obs"):
                row[f"peak_MB_{method}"], row["rss_before_MB"] = peak_memory(name, 1024, method)
        rows.append(row)
        notes += [
            f"### {name}: where one lsq reconstruction spends its time (cProfile, self time)",
            "",
            "```",
            breakdown(session, batches, masks),
            "```",
            "",
        ]
        print(json.dumps(row), flush=True)
    lines = [
        "# Reconstruction benchmark",
        "",
        f"Command: `python {' '.join(['studies/bench_reconstruct.py', *sys.argv[1:]])}`  ",
        f"Machine: {machine()}.",
        "",
        "1024 calibration images, global magnitude at 0.9, batch 256; times in seconds (median of "
        f"{args.repeats}); ratios measured in this run.",
        "",
        "| model | T_f | T_lsq | T_obs | T_lsq / T_f | T_obs / T_f | profile lsq / channel | peak MB lsq | peak MB obs "
        "| RSS before MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['T_f']:.2f} | {r['T_lsq']:.2f} | {r['T_obs']:.2f} | {r['lsq_over_forward']:.1f} | "
            f"{r['obs_over_forward']:.1f} | {r['profile_lsq_over_channel']:.2f} | "
            f"{r.get('peak_MB_lsq', float('nan')):.0f} | {r.get('peak_MB_obs', float('nan')):.0f} | "
            f"{r.get('rss_before_MB', float('nan')):.0f} |"
        )
    lines += [""] + notes
    out = Path(args.out)
    write_text_atomic(out / "bench_reconstruct.json", json.dumps(rows, indent=2) + "\n")
    write_text_atomic(out / "bench_reconstruct.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
