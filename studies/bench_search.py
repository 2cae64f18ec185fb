"""Benchmark: candidates per minute of the end-to-end search, and where one candidate's time goes.

For CIFAR ResNet-20/32 with the channel-wise default repair in the loop, 1024 calibration and
``--selection`` selection images (pre-decoded), global magnitude at 0.9 as the candidate:

- phases of one candidate (median of ``--repeats``): copy + masks, BN recalibration (one calibration
  pass in train mode), the staged channel-wise repair (one calibration pass with statistics), the
  forward over the selection split; ``T_f`` is one dense forward over the calibration split;
- candidates per minute of: the unscreened evaluation (``Session.verify`` on the whole selection split),
  a full-fidelity candidate of the scorer (``SelectionScorer``, per-image losses under inference mode),
  and a screened-out candidate (repair + a quarter of the selection split). Whole searches' rates (a mix of
  screened-out and full candidates) are the ``candidates / min`` column of the search study's summary.

Every rate is measured in this one run (interleaved repeats), so the ratios hold on a noisy machine.

    python studies/bench_search.py          # writes studies/results/bench_search/
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from bench_profile import dense_pass, median_time
from common import ROOT, machine, model_config, run_main, shared_dir

from rr_alloc.api import allocate, verify
from rr_alloc.evaluation import kept_copies
from rr_alloc.nn.pruning import Pruning, apply_masks
from rr_alloc.repair import CHANNEL_REPAIR, RepairPipeline, run_repair
from rr_alloc.search.scoring import SelectionScorer
from rr_alloc.session import Session
from rr_alloc.system.files import write_text_atomic


def phases(session: Session, counts: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each phase of one candidate."""
    masks = Pruning(counts=counts).keep_masks(session.dense)
    pipe = RepairPipeline.parse(CHANNEL_REPAIR)
    bn_only, channel = RepairPipeline(pipe.steps[:1]), RepairPipeline(pipe.steps[1:])
    state: dict = {}

    def copy_mask() -> None:
        state["m"] = copy.deepcopy(session.dense)
        apply_masks(state["m"], masks)

    def bn() -> None:
        copy_mask()
        run_repair(
            state["m"], bn_only, session.splits.calib, device=session.device, cache=session.site_cache, masks=masks
        )

    def bn_channel() -> None:
        bn()
        run_repair(
            state["m"], channel, session.splits.calib, device=session.device, cache=session.site_cache, masks=masks
        )

    t_copy = median_time(copy_mask, repeats)
    t_bn = median_time(bn, repeats) - t_copy
    t_all = median_time(bn_channel, repeats)
    scorer = SelectionScorer(session, CHANNEL_REPAIR)
    model = scorer.model(counts)
    t_sel = median_time(lambda: scorer.losses(model, "selection"), repeats)
    t_screen = median_time(lambda: scorer.losses(model, "selection", scorer.screen_idx), repeats)
    t_f = median_time(lambda: dense_pass(session.dense, session.splits.calib), repeats)
    return {
        "T_f": t_f,
        "copy_masks": t_copy,
        "bn_recalibration": t_bn,
        "channel_repair": t_all - t_copy - t_bn,
        "selection_forward": t_sel,
        "screen_forward": t_screen,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--selection", type=int, default=2048)
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet32"])
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "bench_search"))
    args = ap.parse_args()
    shared_dir(args.shared)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        kw = {"model": name, "repair": CHANNEL_REPAIR, "selection_size": args.selection, "eval_size": 16}
        session = Session(model_config(**kw), progress=False)
        counts = allocate(session, "global", 0.9).counts
        ph = phases(session, counts, args.repeats)
        scorer = SelectionScorer(session, CHANNEL_REPAIR)
        kept = kept_copies(session)  # cleared before each call: every call repairs, as a new candidate does
        t_v01 = median_time(
            lambda: kept.clear() or verify(session, counts, CHANNEL_REPAIR, ("selection",)), args.repeats
        )
        t_full = median_time(lambda: kept.clear() or scorer.score(counts), args.repeats)
        t_scr = median_time(lambda: kept.clear() or scorer.score(counts, beat=-1.0), args.repeats)  # screened out
        row = {
            "model": name,
            "calib": session.splits.calib.n,
            "selection": session.splits.selection.n,
            "screen": scorer.screen_size,
            "threads": torch.get_num_threads(),
            **ph,
            "per_min_v01": 60 / t_v01,
            "per_min_full": 60 / t_full,
            "per_min_screened_out": 60 / t_scr,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        "# Search benchmark: candidates per minute",
        "",
        f"Command: `python {' '.join(['studies/bench_search.py', *sys.argv[1:]])}`  ",
        f"Machine: {machine()}.",
        "",
        f"Channel-wise default repair `{CHANNEL_REPAIR}` in the loop; the candidate is global magnitude at 0.9; "
        f"times are medians of {args.repeats}; rates and ratios measured in this run.",
        "",
        "## Candidates per minute",
        "",
        "| model | calib / selection / screen | unscreened verify | scorer, full | scorer, screened out | "
        "screened out / unscreened |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['calib']} / {r['selection']} / {r['screen']} | {r['per_min_v01']:.1f} | "
            f"{r['per_min_full']:.1f} | {r['per_min_screened_out']:.1f} | "
            f"{r['per_min_screened_out'] / r['per_min_v01']:.2f} |"
        )
    lines += [
        "",
        "Whole searches (a mix of screened-out and full candidates): the `candidates / min` column of "
        "[the search study](../allocation_search/summary.md), measured there.",
        "",
    ]
    lines += [
        "",
        "## Where one full-fidelity candidate's time goes (seconds)",
        "",
        "| model | dense forward T_f | copy + masks | BN recalibration | channel repair | selection forward | "
        "screen forward | sum / T_f |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        total = r["copy_masks"] + r["bn_recalibration"] + r["channel_repair"] + r["selection_forward"]
        lines.append(
            f"| {r['model']} | {r['T_f']:.2f} | {r['copy_masks']:.2f} | {r['bn_recalibration']:.2f} | "
            f"{r['channel_repair']:.2f} | {r['selection_forward']:.2f} | {r['screen_forward']:.2f} | "
            f"{total / r['T_f']:.1f} |"
        )
    lines += [
        "",
        "A full-fidelity candidate is two passes over the calibration images (BN recalibration, then the "
        "staged channel-wise repair, which depends on it) and one forward over the selection images; each is "
        "close to a dense forward of its images (`T_f` per 1024), so at equal fidelity the floor is about "
        "`(2 x calib + selection) / 1024 x T_f` and the unscreened evaluation was already near it. The search gains "
        "its rate "
        "by screening: a child that does not beat its parent on a seeded random quarter of the selection images "
        "skips the rest.",
        "",
    ]
    out = Path(args.out)
    write_text_atomic(out / "bench_search.json", json.dumps(rows, indent=2) + "\n")
    write_text_atomic(out / "bench_search.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
