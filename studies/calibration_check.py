"""The calibration check: does BatchNorm recalibration on the calibration images alone move the *dense* model?

For each model and calibration source, the dense model is recalibrated (``bn``) on its calibration split and
compared with itself on the selection split (agreement, mean KL). Beside it, what the check is for: global
magnitude at ``--budget`` repaired by ``obs>bn>naive@block+logits`` and by the same without ``bn``, scored on
the selection split. The threshold ``rr_alloc.repair.bn.CALIBRATION_MIN_AGREEMENT`` separates the settings where
``bn`` helps the pruned model from those where it hurts.

    python studies/calibration_check.py                     # every setting below, seeds 0-2
    python studies/calibration_check.py --settings digits   # one

Writes studies/results/calibration_check/{checks.csv,summary.md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
from common import ROOT, machine, model_config, shared_dir

from rr_alloc.api import allocate, verify
from rr_alloc.config.run_config import RunConfig
from rr_alloc.plans.report import write_frame_csv
from rr_alloc.repair.bn import CALIBRATION_MIN_AGREEMENT, calibration_check
from rr_alloc.session import Session
from rr_alloc.system.files import write_text_atomic

sys.path.insert(0, str(Path(__file__).parent))  # the EfficientNet-Lite factories
from efficientnet_lite import TRANSFORMS  # noqa: E402

OUT = ROOT / "studies" / "results" / "calibration_check"

# damping 0.01 written out: the committed rows were measured with it (damp=auto gives 0.04 on 256 images)
BN, NO_BN = "obs:damp=0.01>bn>naive@block+logits", "obs:damp=0.01>naive@block+logits"


def settings(shared: Path) -> dict[str, dict]:
    photos = shared / "data" / "imagenet-photos"
    cifar = shared / "data" / "cifar10-jpeg"
    edge = {"dataset": "imagefolder", "calib_size": 256, "selection_size": 256, "eval_size": 16, "batch_size": 32}
    return {
        "digits": {"what": "embedded digits model, digits images"},
        "resnet20-cifar": {"what": "CIFAR ResNet-20, CIFAR-10 images", "model": "resnet20"},
        "lite1-imagenet": {
            "what": "EfficientNet-Lite1, ImageNet photos (pool/)",
            **edge,
            "model": "efficientnet_lite:lite1",
            "transform": TRANSFORMS["lite1"],
            "train_data": str(photos / "pool"),
            "test_data": str(photos / "fidelity"),
        },
        "lite2-imagenet": {
            "what": "EfficientNet-Lite2, ImageNet photos (pool/)",
            **edge,
            "model": "efficientnet_lite:lite2",
            "transform": TRANSFORMS["lite2"],
            "train_data": str(photos / "pool"),
            "test_data": str(photos / "fidelity"),
        },
        "lite1-cifar": {
            "what": "EfficientNet-Lite1, CIFAR-10 images resized to 240 px (off-distribution)",
            **edge,
            "model": "efficientnet_lite:lite1",
            "transform": TRANSFORMS["lite1"],
            "train_data": str(cifar / "train-10k"),
            "test_data": str(cifar / "test"),
        },
    }


def config(spec: dict, seed: int) -> RunConfig:
    kw = {k: v for k, v in spec.items() if k != "what"}
    if kw.get("model") in ("resnet20", "resnet32"):
        return model_config(kw.pop("model"), seed=seed, repair="bn", **kw)
    return RunConfig(seed=seed, repair="bn", cache=False, **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", help="path to shared/ (default $RR_ALLOC_SHARED or ../shared)")
    p.add_argument("--settings", nargs="+", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=0.5, help="global magnitude sparsity of the pruned comparison")
    p.add_argument("--check-only", action="store_true", help="the dense check alone (no pruned comparison)")
    p.add_argument("--tag", default="", help="suffix of the output files (checks<tag>.csv, summary<tag>.md)")
    args = p.parse_args()
    shared = shared_dir(args.shared)
    all_settings = settings(shared)
    rows: list[dict] = []
    for name in args.settings or list(all_settings):
        for seed in args.seeds:
            t0 = time.perf_counter()
            session = Session(config(all_settings[name], seed), progress=False)
            s = session.splits
            check = calibration_check(session.dense, s.calib, s.selection, session.device)
            row = {"setting": name, "what": all_settings[name]["what"], "seed": seed, "calib": s.calib.n}
            row.update(selection=s.selection.n, agreement=check.agreement, kl=check.kl)
            row["check_seconds"] = round(time.perf_counter() - t0, 1)
            counts = allocate(session, "global", args.budget).counts
            pipes = () if args.check_only else (("bn", BN), ("no_bn", NO_BN))
            for label, pipe in pipes:
                t0 = time.perf_counter()
                m = verify(session, counts, pipe, splits=("selection",))["selection"]
                row.update({f"{label}_agreement": m.agreement, f"{label}_kl": m.kl})
                row[f"{label}_seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(rows[-1], flush=True)
            _write(pd.DataFrame(rows), args.budget, args.tag)


def _write(df: pd.DataFrame, budget: float, tag: str = "") -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write_frame_csv(df, OUT / f"checks{tag}.csv")
    for col in ("bn_agreement", "no_bn_agreement", "bn_seconds"):
        if col not in df:
            df[col] = float("nan")
    lines = [
        "# Calibration check: BatchNorm recalibration of the dense model on its calibration images",
        "",
        f"machine: {machine()}; in use: agreement below {CALIBRATION_MIN_AGREEMENT} leaves `bn` out of the default",
        "",
        "Dense model recalibrated on the calibration images, against itself on the selection split (mean over",
        f"seeds, min-max); then global magnitude at {budget} with `obs>bn>naive@block+logits` (bn) and",
        "`obs>naive@block+logits` (no bn): selection agreement % with the dense model, mean over seeds; seconds per",
        "pipeline.",
        "",
        "| setting | calib / selection | seeds | check agreement % | check KL | pruned: bn | pruned: no bn | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, g in df.groupby("setting", sort=False):
        lines.append(
            f"| {g.what.iloc[0]} | {g.calib.iloc[0]} / {g.selection.iloc[0]} | {len(g)} | "
            f"{100 * g.agreement.mean():.2f} ({100 * g.agreement.min():.2f}-{100 * g.agreement.max():.2f}) | "
            f"{g.kl.mean():.3f} ({g.kl.min():.3f}-{g.kl.max():.3f}) | {100 * g.bn_agreement.mean():.2f} | "
            f"{100 * g.no_bn_agreement.mean():.2f} | {g.bn_seconds.mean():.0f} |"
        )
    lines += ["", "    python studies/calibration_check.py"]
    write_text_atomic(OUT / f"summary{tag}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
