"""Benchmark: RR profiling cost against its floor and against brute force.

For CIFAR ResNet-20/32, 1024 calibration images (pre-decoded tensors), a
6-point grid, the same batch size, thread count and ``torch.inference_mode``:

- ``T_f``  dense forward over the calibration set, no hooks;
- ``T_p``  ``profile_rr`` (one streaming pass, all layers x grid points);
- ``T_bf`` brute force: for every (layer, sparsity), prune that layer alone and
  rerun the whole network, collecting the layer's output statistics.
  Measured on a subset of (layer, sparsity) pairs and extrapolated to all
  ``L x G`` (stated in the output).

Each time is the median of ``--repeats`` runs (>= 5). Prints
``T_p / ((1+G) T_f)`` (target <= 1.2) and ``T_bf / T_p`` (targets >= 10 on
ResNet-20, >= 20 on ResNet-32). Peak resident memory of the profile is
measured in fresh subprocesses for ResNet-32 at several batch and
calibration sizes.

    python studies/bench_profile.py            # writes studies/results/bench_profile/
    RR_ALLOC_MALLOC_TUNING=0 python studies/bench_profile.py --no-memory \
        --out studies/results/bench_profile_no_malloc_tuning   # the same without rr_alloc/runtime.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from common import ROOT, machine, model_config, peak_rss_mb, run_main, shared_dir

from rr_alloc import evidence
from rr_alloc.data.splits import Batches
from rr_alloc.nn.layers import prunable_layers
from rr_alloc.nn.pruning import magnitude_mask, n_pruned
from rr_alloc.nn.stats import ChannelMoments, as_bcx
from rr_alloc.profiling.rr import profile_rr
from rr_alloc.session import Session
from rr_alloc.system.files import write_text_atomic
from rr_alloc.system.runtime import tune_malloc

GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache / cuDNN autotune)
    _sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def dense_pass(model, batches) -> None:
    with torch.inference_mode():
        for x, _ in batches:
            model(x)


def brute_force_pair(model, batches, name: str, s: float) -> None:
    """Prune one layer, rerun the network, collect that layer's output moments (as a brute force would)."""
    mod = model.get_submodule(name)
    w = mod.weight.data.clone()
    mom = ChannelMoments()
    cdim = -1 if isinstance(mod, torch.nn.Linear) else 1
    h = mod.register_forward_hook(lambda m, i, o: mom.add_batch(as_bcx(o, cdim)))
    try:
        mod.weight.data.mul_(magnitude_mask(w, n_pruned(s, w.numel())))
        dense_pass(model, batches)
    finally:
        h.remove()
        mod.weight.data.copy_(w)


def bench_inputs(model_name: str, batch_size: int, device: str = "cpu") -> tuple[Session, Batches]:
    """The model and its calibration images as pre-decoded tensors already on the device (same for every timing)."""
    session = Session(
        model_config(model_name, batch_size=batch_size, selection_size=0, eval_size=16, cache=False, device=device),
        progress=False,
    )
    return session, Batches(session.splits.calib.x.to(session.device), session.splits.calib.y, batch_size)


def bench_model(model_name: str, session: Session, batches: Batches, repeats: int, subset: int) -> dict:
    model = session.dense
    layers = prunable_layers(model)
    G, L = len(GRID), len(layers)
    t_f = median_time(lambda: dense_pass(model, batches), repeats)
    t_p = median_time(lambda: profile_rr(model, batches, GRID, layers, device=session.device), repeats)
    # one more profile under getrusage: page faults and the kernel's share of the time (see rr_alloc/runtime.py)
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    profile_rr(model, batches, GRID, layers, device=session.device)
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - w0
    faults, sys_share = r1.ru_minflt - r0.ru_minflt, (r1.ru_stime - r0.ru_stime) / max(wall, 1e-9)
    # brute force on an evenly spread subset of (layer, sparsity) pairs, extrapolated to L x G
    pairs = [(layers[i].name, GRID[j]) for i in range(L) for j in range(G)]
    pick = pairs[:: max(1, len(pairs) // subset)][:subset]
    t_pairs = [median_time(lambda p=p: brute_force_pair(model, batches, *p), max(1, repeats // 2)) for p in pick]
    t_bf = statistics.mean(t_pairs) * L * G
    return {
        "model": model_name,
        "device": str(session.device),
        "layers": L,
        "grid": G,
        "images": batches.n,
        "batch_size": batches.batch_size,
        "threads": torch.get_num_threads(),
        "T_f": t_f,
        "T_p": t_p,
        "T_bf": t_bf,
        "bf_measured_pairs": len(pick),
        "floor_ratio": t_p / ((1 + G) * t_f),
        "speedup_vs_bf": t_bf / t_p,
        "bf_ceiling": L * G / (1 + G),
        "profile_page_faults": faults,
        "profile_kernel_time_share": sys_share,
    }


def op_breakdown(model_name: str, session: Session, batches: Batches) -> str:
    """torch.profiler's top operators (self time) for one dense pass and one profile: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if session.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if session.device.type == "cuda" else "self_cpu_time_total"
    out = []
    for label, fn in (
        ("dense pass", lambda: dense_pass(session.dense, batches)),
        ("profile_rr", lambda: profile_rr(session.dense, batches, GRID, device=session.device)),
    ):
        fn()  # warm-up
        with profile(activities=acts) as prof:
            fn()
            _sync()
        out += [f"{model_name}, {label}:", "```", prof.key_averages().table(sort_by=sort, row_limit=10), "```", ""]
    return "\n".join(out)


def peak_memory(model_name: str, calib: int, batch_size: int) -> tuple[float, float]:
    """(peak RSS during the profile, RSS just before it), MB, in a fresh process that loads the data first.

    The kernel's high-water mark is reset right before profiling (``/proc/self/clear_refs``), so the peak
    is the profile's own and not an earlier one (decoding, imports); where that reset is not allowed the
    process-lifetime peak is reported instead.
    """
    setup = (
        f"from common import model_config\nfrom rr_alloc.session import Session\n"
        f"from rr_alloc.profiling.rr import profile_rr\n"
        f"session = Session(model_config({model_name!r}, calib_size={calib}, selection_size=0, eval_size=16, "
        f"batch_size={batch_size}, cache=False), progress=False)\n"
    )
    return peak_rss_mb(setup, f"profile_rr(session.dense, session.splits.calib, {GRID!r})\n")


def cache_cost(model_name: str) -> dict:
    """Profiling cost of a first run (cache miss) and a second run of a new process state (cache hit)."""
    import tempfile

    old = os.environ.get("RR_ALLOC_CACHE")
    with tempfile.TemporaryDirectory() as d:
        os.environ["RR_ALLOC_CACHE"] = d
        try:
            times = []
            for _ in range(2):
                session = Session(model_config(model_name, selection_size=0, eval_size=16), progress=False)
                t0 = time.perf_counter()
                prof = evidence.profile(session)
                times.append((time.perf_counter() - t0, prof.meta["cache"]))
        finally:
            if old is None:
                os.environ.pop("RR_ALLOC_CACHE", None)
            else:
                os.environ["RR_ALLOC_CACHE"] = old
    (t_miss, m1), (t_hit, m2) = times
    return {
        "model": model_name,
        "first_s": t_miss,
        "first": m1,
        "second_s": t_hit,
        "second": m2,
        "ratio": t_hit / t_miss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--subset", type=int, default=8, help="(layer, sparsity) pairs timed for brute force")
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet32"])
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="append torch.profiler operator tables")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "bench_profile"))
    args = ap.parse_args()
    shared_dir(args.shared)
    rows, breakdowns = [], []
    for m in args.models:
        session, batches = bench_inputs(m, args.batch_size, args.device)
        rows.append(bench_model(m, session, batches, args.repeats, args.subset))
        if args.breakdown:
            breakdowns.append(op_breakdown(m, session, batches))
    caches = [cache_cost(m) for m in args.models] if args.device == "cpu" else []
    mem = []
    if not args.no_memory:
        for calib, bs in ((1024, 256), (4096, 128), (4096, 256), (4096, 512)):
            peak, base = peak_memory("resnet32", calib, bs)
            mem.append(
                {
                    "model": "resnet32",
                    "calib": calib,
                    "batch_size": bs,
                    "peak_rss_mb": round(peak),
                    "rss_before_profile_mb": round(base),
                }
            )
    lines = [
        "# RR profile benchmark",
        "",
        f"Command: `{' '.join(['python', 'studies/bench_profile.py', *sys.argv[1:]])}`  ",
        f"Machine: {machine()}; device {rows[0]['device']}"
        + (f" ({torch.cuda.get_device_name()})" if rows[0]["device"].startswith("cuda") else "")
        + ".  ",
        f"Grid ({len(GRID)} points): {list(GRID)}; median of {args.repeats} runs; "
        "`torch.inference_mode`, pre-decoded tensors, same batch size and threads for all timings.  ",
        f"glibc malloc tuning (`rr_alloc/runtime.py`, as in the CLI): {'on' if tune_malloc() else 'off'}"
        + (" (`RR_ALLOC_MALLOC_TUNING=0`)" if os.environ.get("RR_ALLOC_MALLOC_TUNING") == "0" else "")
        + ".",
        "",
        "| model | L | images | batch | T_f (s) | T_p (s) | T_bf (s, extrapolated) | T_p / ((1+G) T_f) | T_bf / T_p "
        "| ceiling L·G/(1+G) | profile: page faults, kernel CPU time / wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['images']} | {r['batch_size']} | {r['T_f']:.3f} | "
            f"{r['T_p']:.3f} | {r['T_bf']:.1f} | **{r['floor_ratio']:.2f}** | **{r['speedup_vs_bf']:.1f}** | "
            f"{r['bf_ceiling']:.1f} | {r['profile_page_faults'] / 1e6:.2f} M, "
            f"{100 * r['profile_kernel_time_share']:.0f}% |"
        )
    lines += [
        "",
        f"T_bf: {rows[0]['bf_measured_pairs']} (layer, sparsity) pairs timed (median of "
        f"{max(1, args.repeats // 2)} each), mean x L x G.",
        "",
    ]
    if caches:
        lines += [
            "Profile cache: profiling cost of a first run and of a second run with the same model, "
            "calibration images, grid and lambda (the second includes hashing the weights and images):",
            "",
            "| model | first run (s) | second run (s) | second / first |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {c['model']} | {c['first_s']:.2f} ({c['first']}) | {c['second_s']:.3f} ({c['second']}) | "
            f"{100 * c['ratio']:.1f}% |"
            for c in caches
        ]
        lines.append("")
    if mem:
        lines += [
            "Peak resident memory of a fresh process while it runs one ResNet-32 profile (high-water mark "
            "reset just before profiling; includes Python, torch and the decoded calibration tensors, "
            "which are the RSS before profiling):",
            "",
            "| calibration images | batch | peak RSS (MB) | RSS before profiling (MB) | profile's own peak (MB) |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {m['calib']} | {m['batch_size']} | {m['peak_rss_mb']} | {m['rss_before_profile_mb']} | "
            f"{m['peak_rss_mb'] - m['rss_before_profile_mb']} |"
            for m in mem
        ]
    if args.breakdown:
        lines += ["", "## Operator breakdown (`--breakdown`, torch.profiler, one call each after a warm-up)", ""]
        lines += breakdowns
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    write_text_atomic(out / "bench_profile.md", text)
    write_text_atomic(
        out / "bench_profile.json", json.dumps({"timings": rows, "cache": caches, "memory": mem}, indent=2)
    )
    print(text)


if __name__ == "__main__":
    run_main(main)
