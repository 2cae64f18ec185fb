"""Benchmark at ImageNet scale: the RR profile and the reconstruction of a ResNet-50 at 224 px.

torchvision's ResNet-50 with random weights (speed and memory only: no download), the shared CIFAR-10
JPEGs resized to 224 px, ``--images`` calibration images (default 256), global magnitude at 0.7. In one
run, on this machine:

- ``T_f``    one dense forward over the calibration images;
- ``T_p``    the channel-wise RR profile (``G`` grid points), against ``(1 + G) T_f``;
- ``T_obs``  ``obs`` reconstruction of every layer (``solve=auto``: the exact re-fit where it is at most
  5e10 flops per group, SparseGPT's sweep above), lockstep propagation, against ``2 T_f`` (the dense and
  the pruned forward it cannot avoid);
- the streaming path (per-layer partial passes, as when the activations do not fit the cap): the first
  ``--streaming-layers`` layers, timed and extrapolated to all layers by their count (labelled so);
- peak resident memory of each phase (high-water mark reset before it).

    python studies/bench_imagenet_scale.py        # writes studies/results/bench_imagenet_scale/
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from common import ROOT, machine, run_main, shared_dir

from rr_alloc.api import allocate
from rr_alloc.config.run_config import RunConfig
from rr_alloc.nn.pruning import Pruning, apply_masks
from rr_alloc.profiling.rr import DEFAULT_GRID, profile_rr
from rr_alloc.repair.reconstruct import ReconstructStep, reconstruct
from rr_alloc.session import Session
from rr_alloc.system.files import write_text_atomic


def _hwm_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not allowed here: the process-lifetime peak is reported instead
        pass


def _hwm_mb() -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def phase(fn) -> tuple[float, float, object]:
    """(seconds, peak RSS MB, result) of ``fn()``."""
    _hwm_reset()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, _hwm_mb(), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", help="path to shared/ (default $RR_ALLOC_SHARED or ../shared)")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.7)
    ap.add_argument("--cache-gb", type=float, default=14.0, help="activation cache cap of the lockstep path")
    ap.add_argument("--streaming-layers", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "bench_imagenet_scale"))
    args = ap.parse_args()
    shared = shared_dir(args.shared)
    data = shared / "data" / "cifar10-jpeg"
    tf = {"resize": 224, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    cfg = RunConfig(
        model=args.model,
        num_classes=10,
        dataset="imagefolder",
        train_data=str(data / "train-10k"),
        test_data=str(data / "test"),
        transform=tf,
        calib_size=args.images,
        selection_size=1,
        eval_size=8,
        batch_size=args.batch_size,
        cache=False,
    )
    torch.manual_seed(0)
    session = Session(cfg, progress=False)
    calib = session.splits.calib
    layers = [layer.name for layer in session.layers]
    counts = allocate(session, "global", args.budget).counts
    masks = Pruning(counts=counts).keep_masks(session.dense)

    def dense() -> None:
        with torch.inference_mode():
            for x, _ in calib:
                session.dense(x)

    dense()  # warm-up
    t_f, m_f, _ = phase(dense)
    t_p, m_p, _ = phase(lambda: profile_rr(session.dense, calib, DEFAULT_GRID, session.layers))

    def obs(cap: float, only: list[str]) -> object:
        pruned = copy.deepcopy(session.dense)
        apply_masks(pruned, masks)
        return reconstruct(pruned, session.dense, calib, only, ReconstructStep("obs"), masks=masks, max_cache_bytes=cap)

    t_o, m_o, rep = phase(lambda: obs(args.cache_gb * 1e9, layers))
    step = ReconstructStep("obs")
    swept = [n for n in rep.fitted if step.sweeps(session.dense.get_submodule(n))]
    first = layers[: args.streaming_layers]
    t_s, m_s, rep_s = phase(lambda: obs(0.0, first))  # a cap of 0: every layer by its own partial passes
    G = len(DEFAULT_GRID)
    rows = {
        "model": args.model,
        "images": calib.n,
        "px": 224,
        "layers": len(layers),
        "G": G,
        "T_f": t_f,
        "T_p": t_p,
        "T_obs": t_o,
        "T_stream_first": t_s,
        "stream_layers": len(first),
        "T_p / ((1+G) T_f)": t_p / ((1 + G) * t_f),
        "T_obs / (2 T_f)": t_o / (2 * t_f),
        "T_stream extrapolated / (2 T_f)": t_s * len(layers) / len(first) / (2 * t_f),
        "peak MB dense": m_f,
        "peak MB profile": m_p,
        "peak MB obs": m_o,
        "peak MB streaming": m_s,
        "obs path": rep.path,
        "swept layers": len(swept),
        "exact layers": len(rep.fitted) - len(swept),
        "left": dict(rep.skipped),
        "streaming path": rep_s.path,
    }
    out = Path(args.out)
    write_text_atomic(out / "bench_imagenet_scale.json", json.dumps(rows, indent=2) + "\n")
    lines = [
        "# ImageNet scale: RR profile and reconstruction of a ResNet-50 at 224 px",
        "",
        f"Command: `python {' '.join(['studies/bench_imagenet_scale.py', *sys.argv[1:]])}`  ",
        f"Machine: {machine()}. Random weights (speed and memory only), {calib.n} CIFAR-10 training JPEGs "
        f"resized to 224 px, batch {args.batch_size}, global magnitude at {args.budget}; one run.",
        "",
        "| phase | seconds | ratio | peak RSS MB |",
        "|---|---:|---:|---:|",
        f"| dense forward `T_f` | {t_f:.1f} | 1 | {m_f:.0f} |",
        f"| RR profile (G = {G}) | {t_p:.1f} | {rows['T_p / ((1+G) T_f)']:.2f} x (1+G) T_f | {m_p:.0f} |",
        f"| obs reconstruction, {rep.path} | {t_o:.1f} | {rows['T_obs / (2 T_f)']:.2f} x 2 T_f | {m_o:.0f} |",
        f"| streaming (per-layer passes), first {len(first)} layers | {t_s:.1f} | "
        f"{rows['T_stream extrapolated / (2 T_f)']:.2f} x 2 T_f, extrapolated to {len(layers)} layers | "
        f"{m_s:.0f} |",
        "",
        f"Reconstruction: {len(rep.fitted)} layers fitted ({len(swept)} by the sweep, "
        f"{len(rep.fitted) - len(swept)} exactly), {len(rep.skipped)} left as they were"
        + (f" ({', '.join(f'{k}: {v}' for k, v in list(rep.skipped.items())[:3])})" if rep.skipped else "")
        + ".",
        "",
    ]
    write_text_atomic(out / "bench_imagenet_scale.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
