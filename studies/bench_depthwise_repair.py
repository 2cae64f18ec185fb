"""Benchmark: the whole ``obs`` reconstruction of EfficientNet-Lite1, this checkout against another one.

EfficientNet-Lite1 (ImageNet weights) calibrated on ``--calib`` photos of ``shared/data/imagenet-photos/pool``,
global magnitude at ``--sparsity``, repaired by ``obs>naive@block+logits`` (the default repair when the
calibration check leaves ``bn`` out, as it does on these photos). Each run is a fresh process; the session,
the dense logits and the allocation are outside the timing. The two checkouts alternate (``--repeats``
rounds), so their ratio is measured in one run; both report the repaired model's agreement and KL with the
dense model on the selection split, which must match (the same method, computed differently).

    git worktree add /tmp/before <commit>            # the code to compare with
    python studies/bench_depthwise_repair.py --before /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT, machine, run_main, shared_dir, write_report

from rr_alloc.errors import UserError

STUDIES = Path(__file__).resolve().parent
REPAIR = "obs:damp=0.01>naive@block+logits"  # as measured (and parsed by checkouts before damp=auto)

RUN = """
import json, sys, time
sys.path.insert(0, {studies!r})
from efficientnet_lite import TRANSFORMS
from rr_alloc.api import allocate
from rr_alloc.config.run_config import RunConfig
from rr_alloc.evaluation import repaired_model
from rr_alloc.nn.metrics import logits_of, per_image
from rr_alloc.session import Session
cfg = RunConfig(model="efficientnet_lite:lite1", dataset="imagefolder", train_data={pool!r}, test_data={pool!r},
    transform=TRANSFORMS["lite1"], calib_size={calib}, selection_size={selection}, validation_size=16, eval_size=16,
    batch_size=32, seed=0, repair={repair!r}, cache=False)
session = Session(cfg, progress=False)
counts = allocate(session, "global", {sparsity}).counts
dense, _ = session.dense_logits("selection")
t0 = time.perf_counter()
model, _ = repaired_model(session, counts, {repair!r})
seconds = time.perf_counter() - t0
agree, kl = per_image(logits_of(model, session.split("selection"), session.device)[0], dense)
print(json.dumps({{"seconds": seconds, "agreement": float(agree.mean()), "kl": float(kl.mean())}}))
"""


def run_once(checkout: Path, args: argparse.Namespace, pool: Path) -> dict:
    code = RUN.format(
        studies=str(STUDIES), pool=str(pool), calib=args.calib, selection=args.selection,
        sparsity=args.sparsity, repair=REPAIR,
    )  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(checkout))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=checkout)
    if out.returncode != 0:
        raise UserError(f"the run in {checkout} failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", help="path to shared/ (default $RR_ALLOC_SHARED or ../shared)")
    p.add_argument("--before", type=Path, required=True, help="a checkout of the code to compare with")
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--selection", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "studies" / "results" / "bench_depthwise_repair")
    args = p.parse_args()
    if not (args.before / "rr_alloc").is_dir():
        raise UserError(f"--before {args.before} holds no rr_alloc/: pass a checkout of this repository")
    pool = shared_dir(args.shared) / "data" / "imagenet-photos" / "pool"
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.repeats):
        for arm, checkout in (("before", args.before.resolve()), ("after", ROOT)):
            runs[arm].append(run_once(checkout, args, pool))
            print(arm, runs[arm][-1], flush=True)
    med = {arm: statistics.median(r["seconds"] for r in rs) for arm, rs in runs.items()}
    rev = subprocess.run(
        ["git", "-C", str(args.before), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    lines = [
        "# The `obs` reconstruction of EfficientNet-Lite1: this checkout against an earlier one",
        "",
        f"`python studies/bench_depthwise_repair.py --before <checkout of {rev.stdout.strip() or '?'}> --calib "
        f"{args.calib} --selection {args.selection} --sparsity {args.sparsity} --repeats {args.repeats}` on "
        f"{machine()}.",
        f"`{REPAIR}` on global magnitude at {args.sparsity}, {args.calib} calibration photos; seconds of the "
        "repair alone, fresh process per run, the arms alternating; agreement and KL with the dense model on "
        f"{args.selection} selection photos.",
        "",
        "| checkout | runs | seconds (median) | each run | agreement % | KL |",
        "|---|---|---|---|---|---|",
        *(
            f"| {arm} | {len(rs)} | {med[arm]:.0f} | {', '.join(str(round(r['seconds'])) for r in rs)} | "
            f"{100 * rs[-1]['agreement']:.2f} | {rs[-1]['kl']:.4f} |"
            for arm, rs in runs.items()
        ),
        "",
        f"Ratio before / after: **{med['before'] / med['after']:.2f}x**.",
    ]
    write_report(args.out / "bench.md", lines)


if __name__ == "__main__":
    run_main(main)
