"""What the kd repair step costs, as a ratio to dense forwards over the images it uses, measured in one run.

ResNet-20 (CIFAR-10 config) at 0.9, global magnitude counts, ``obs>bn>naive@block+logits`` once; then for each
loss, ``kd`` on a copy of the repaired model for ``--steps`` steps, against the dense model's forward over the
same number of images (``steps x batch``, the same batch size). Repeats interleave the arms; medians reported.

    python studies/bench_distill.py                       # CPU
    python studies/bench_distill.py --device cuda         # a GPU, when one is lent

Writes ``studies/results/bench_distill<tag>/bench.md``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import common
import torch

from rr_alloc.api import allocate
from rr_alloc.evaluation import repaired_model
from rr_alloc.repair import RECONSTRUCT_REPAIR, DistillStep, distill
from rr_alloc.session import Session


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", help="path to shared/ (default $RR_ALLOC_SHARED or ../shared)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    common.shared_dir(args.shared)
    cfg = common.model_config("resnet20", device=args.device, repair=RECONSTRUCT_REPAIR)
    session = Session(cfg, progress=False)
    repaired, report = repaired_model(session, allocate(session, "global", 0.9).counts, RECONSTRUCT_REPAIR)
    images = session.splits.calib.x
    n_images = args.steps * args.batch
    sync = torch.cuda.synchronize if session.device.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def dense_forwards() -> float:
        order = torch.randint(0, len(images), (n_images,), generator=torch.Generator().manual_seed(0))
        sync()
        t0 = time.perf_counter()
        for i in range(0, n_images, args.batch):
            session.dense(images[order[i : i + args.batch]].to(session.device))
        sync()
        return time.perf_counter() - t0

    def kd(loss: str) -> float:
        model = copy.deepcopy(repaired)
        step = DistillStep(steps=args.steps, batch=args.batch, loss=loss)
        sync()
        t0 = time.perf_counter()
        distill(model, session.dense, images, step, report.masks, session.device, seed=0)
        sync()
        return time.perf_counter() - t0

    losses = ("kl", "kl+block")
    times: dict[str, list[float]] = {"dense": [], **{loss: [] for loss in losses}}
    dense_forwards()  # warm-up
    for _ in range(args.repeats):
        times["dense"].append(dense_forwards())
        for loss in losses:
            times[loss].append(kd(loss))
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        "# bench_distill: the kd step against dense forwards over the same images",
        "",
        f"ResNet-20 at 0.9 (global counts, {RECONSTRUCT_REPAIR}), {args.steps} steps x {args.batch} images, "
        f"device {session.device}; median of {args.repeats} interleaved repeats.",
        "",
        f"machine: {common.machine()}",
        "",
        "| arm | seconds | per step (ms) | ratio to dense forwards |",
        "|---|---|---|---|",
        f"| dense forwards over {n_images} images | {med['dense']:.2f} | "
        f"{1000 * med['dense'] / args.steps:.1f} | 1.0 |",
    ]
    for loss in losses:
        lines.append(
            f"| kd, loss={loss} | {med[loss]:.2f} | {1000 * med[loss] / args.steps:.1f} | "
            f"{med[loss] / med['dense']:.1f} |"
        )
    lines += ["", "raw seconds: " + ", ".join(f"{k}: {[round(x, 2) for x in v]}" for k, v in times.items())]
    out = common.ROOT / "studies" / "results" / f"bench_distill{args.tag}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    common.run_main(main)
