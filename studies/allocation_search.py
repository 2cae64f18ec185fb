"""Does an end-to-end search beat global magnitude? (the ``--search`` part of allocation_comparison.py)

The search (``--allocator optuna``) runs with the channel-wise default repair in the loop on CIFAR
ResNet-20/32 (``shared/`` weights and data), scored by mean KL to the dense logits on a selection split of
training images; every searched plan is then checked against global magnitude on a disjoint validation
split of training images (the fallback rule of the tool) and reported on the test split.

(A) optimiser x RR guidance on ResNet-20 at 0.9: evo with RR guidance, evo without, CMA-ES; the same
    calibration seeds and number of evaluations (trials) each.
(B) the winner of (A) -- the lowest mean *validation* KL, never the test split -- on ResNet-32 at 0.9 and
    ResNet-20 at 0.8 and 0.95 (ResNet-20 at 0.9 is (A)'s cells).
(C) the winner of (A) scored on a larger selection split (``--search-selection-c``, default 4096 images;
    a single-seed trial run gained most with it) on ResNet-20 and ResNet-32 at 0.9, with (A)'s and (B)'s numbers
    of evaluations. The validation split is drawn after the selection split, so its images differ from
    (A)/(B)'s; every margin is paired with global magnitude on the cell's own splits.

Each cell rescores global magnitude under the same repair (a check against the committed rows of
allocation_comparison.py, whose uniform/LAMP/ERK rows give the best baseline: same calibration images).

    python studies/allocation_comparison.py --search                 # (A) then (B)
    python studies/allocation_comparison.py --search --search-phases C   # (C), after (A)
    python studies/allocation_comparison.py --search --quick         # smoke run, separate folder
    python studies/allocation_comparison.py --search --summarise     # rebuild summary from the CSVs

Outputs (studies/results/allocation_search/): cells.csv (one row per cell x plan x split), trials.csv
(every trial: state, selection KL, screen KL), summary.md, search_progress.png, run.log; a notes.md there
(how the run was stopped and resumed) is appended to the summary verbatim.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import ROOT, model_config, t_interval

from rr_alloc import evidence
from rr_alloc.api import allocate, verify
from rr_alloc.plans.report import save_figure, write_frame_csv
from rr_alloc.repair import CHANNEL_REPAIR, RECONSTRUCT_REPAIR
from rr_alloc.session import Session
from rr_alloc.system.files import write_text_atomic

OUT = ROOT / "studies" / "results" / "allocation_search"
BASELINE_CSV = ROOT / "studies" / "results" / "allocation_comparison" / "results.csv"
VARIANTS_A = (("evo", "rr"), ("evo", "none"), ("cmaes", "none"))
CELLS_B = (("resnet32", 0.9), ("resnet20", 0.95), ("resnet20", 0.8))
CELLS_C = (("resnet20", 0.9), ("resnet32", 0.9))


def variant(optimizer: str, guidance: str, selection: int | None = None) -> str:
    """The cell's label: ``evo-rr``, ``cmaes``; ``evo-rr-sel4096`` when (C) scores on another selection size."""
    name = f"{optimizer}-{guidance}" if optimizer == "evo" else optimizer
    return f"{name}-sel{selection}" if selection else name


def run_cell(
    model: str,
    budget: float,
    optimizer: str,
    guidance: str,
    seed: int,
    settings: dict[str, Any],
    log: Callable[[str], None],
    label: str | None = None,
) -> tuple[list[dict], list[dict]]:
    """One search; rows for the searched plan, global magnitude and the returned plan on every split."""
    label = label or variant(optimizer, guidance)
    cfg = model_config(
        model,
        seed=seed,
        repair=CHANNEL_REPAIR,
        allocator="optuna",
        optimizer=optimizer,
        guidance=guidance,
        n_trials=settings["trials"],
        selection_size=settings["selection"],
        validation_size=settings["validation"],
        **settings.get("overrides", {}),
    )
    session = Session(cfg, progress=True)  # the search's progress bar goes to the log
    evidence.profile(session)  # cached across cells: not part of the search's time
    t0 = time.perf_counter()
    searched_alloc = allocate(session, "optuna", budget)
    seconds = time.perf_counter() - t0
    info = searched_alloc.search.to_dict()
    study = searched_alloc.study
    best = min((t for t in study.get_trials(deepcopy=False) if t.value is not None), key=lambda t: t.value)
    searched = dict(zip([l.name for l in session.layers], best.user_attrs["counts"]))
    glob = allocate(session, "global", budget).counts
    key = {
        "model": model,
        "budget": budget,
        "variant": label,
        "optimizer": optimizer,
        "guidance": guidance,
        "seed": seed,
        "selection_size": settings["selection"],
        "trials": info["trials"],
        "pruned": info["pruned"],
        "fallback": info.get("fallback"),
        "search_seconds": seconds,
        "validation_bound": info.get("validation_bound"),
    }
    rows = []
    for plan, counts in (("search", searched), ("global", glob)):
        for split, m in verify(session, counts, CHANNEL_REPAIR, ("selection", "validation", "test")).metrics.items():
            rows.append(
                {
                    **key,
                    "plan": plan,
                    "repair": CHANNEL_REPAIR,
                    "split": split,
                    "n": m.n,
                    "top1": m.top1,
                    "agreement": m.agreement,
                    "kl": m.kl,
                    "achieved_sparsity": session.achieved(counts),
                    "counts": json.dumps([int(counts[l.name]) for l in session.layers]),
                }
            )
    chosen = "global" if info.get("fallback") else "search"
    rows += [{**r, "plan": "returned"} for r in rows if r["plan"] == chosen]
    if settings["transfer"] and searched != glob:
        rows += transfer_rows(session, key, searched, glob)
    trials = [
        {
            **{k: key[k] for k in ("model", "budget", "variant", "seed")},
            "number": t.number,
            "state": t.state.name,
            "kl": t.value,
            "screen": t.user_attrs.get("screen"),
        }
        for t in study.get_trials(deepcopy=False)
    ]
    test = {r["plan"]: r for r in rows if r["split"] == "test" and r["repair"] == CHANNEL_REPAIR}
    log(
        f"{model} b={budget} {label:<8} seed {seed}: {info['trials']} trials "
        f"({info['pruned']} screened out) in {seconds / 60:.1f} min; selection KL {info['best_selection']:.3f} "
        f"(global {info['global_selection']:.3f}); fallback {info.get('fallback')}; test top-1 search "
        f"{100 * test['search']['top1']:.1f} global {100 * test['global']['top1']:.1f}"
    )
    return rows, trials


def transfer_rows(session: Session, key: dict, searched: dict, glob: dict) -> list[dict]:
    """Does a plan searched under the channel-wise repair carry over to the reconstruction repair?"""
    rows = []
    for plan, counts in (("search", searched), ("global", glob)):
        for split, m in verify(session, counts, RECONSTRUCT_REPAIR, ("validation", "test")).metrics.items():
            rows.append(
                {
                    **key,
                    "plan": plan,
                    "repair": RECONSTRUCT_REPAIR,
                    "split": split,
                    "n": m.n,
                    "top1": m.top1,
                    "agreement": m.agreement,
                    "kl": m.kl,
                    "achieved_sparsity": session.achieved(counts),
                }
            )
    return rows


def run_transfer(settings: dict[str, Any], out: Path, log: Callable[[str], None], only: str | None) -> None:
    """Add the transfer rows to the finished cells of ``cells.csv`` that lack them (optionally one variant)."""
    cells_csv = out / "cells.csv"
    df = pd.read_csv(cells_csv)
    have = set(map(tuple, df[df.repair == RECONSTRUCT_REPAIR][["model", "budget", "variant", "seed"]].values))
    chan = df[(df.repair == CHANNEL_REPAIR) & (df.split == "test") & df.plan.isin(["search", "global"])]
    rows = df.to_dict("records")
    for (model, budget, v, seed), g in chan.groupby(["model", "budget", "variant", "seed"], sort=False):
        if (model, budget, v, seed) in have or (only and v != only):
            continue
        counts = {p: json.loads(g[g.plan == p].counts.iloc[0]) for p in ("search", "global")}
        if counts["search"] == counts["global"]:
            continue
        sel = g.selection_size.iloc[0] if "selection_size" in g else np.nan  # older rows: the run's setting
        sel = settings["selection"] if pd.isna(sel) else int(sel)
        cfg = model_config(
            model,
            seed=int(seed),
            repair=CHANNEL_REPAIR,
            selection_size=sel,
            validation_size=settings["validation"],
            **settings.get("overrides", {}),
        )
        session = Session(cfg, progress=False)
        names = [l.name for l in session.layers]
        plans = {p: dict(zip(names, c)) for p, c in counts.items()}
        key = g.iloc[0][
            [
                "model",
                "budget",
                "variant",
                "optimizer",
                "guidance",
                "seed",
                "trials",
                "pruned",
                "fallback",
                "search_seconds",
                "validation_bound",
            ]
        ].to_dict()
        rows += transfer_rows(session, key, plans["search"], plans["global"])
        write_frame_csv(pd.DataFrame(rows), cells_csv)
        log(f"transfer {model} b={budget} {v} seed {seed} done")


def run(settings: dict[str, Any], seeds: list[int], out: Path, log: Callable[[str], None], phases: str = "AB") -> None:
    """(A) then (B), appending to ``cells.csv``/``trials.csv`` after every cell (a stopped run keeps its cells)."""
    cells_csv, trials_csv = out / "cells.csv", out / "trials.csv"
    rows = pd.read_csv(cells_csv).to_dict("records") if cells_csv.exists() else []
    trials = pd.read_csv(trials_csv).to_dict("records") if trials_csv.exists() else []
    done = {(r["model"], r["budget"], r["variant"], r["seed"]) for r in rows}

    def cell(
        model: str, budget: float, opt: str, guid: str, seed: int, settings: dict[str, Any], label: str | None = None
    ) -> None:
        if (model, budget, label or variant(opt, guid), seed) in done:
            return
        r, t = run_cell(model, budget, opt, guid, seed, settings, log, label)
        rows.extend(r)
        trials.extend(t)
        write_frame_csv(pd.DataFrame(rows), cells_csv)
        write_frame_csv(pd.DataFrame(trials), trials_csv)

    if "A" in phases:
        for opt, guid in VARIANTS_A:
            for seed in seeds:
                cell("resnet20", 0.9, opt, guid, seed, settings)
    if "B" in phases:
        opt, guid = winner(pd.DataFrame(rows))
        log(f"(B) winner of (A) by mean validation KL: {variant(opt, guid)}")
        for seed in seeds:  # seed by seed, so a run stopped early has every cell at its first seeds
            for model, budget in CELLS_B:
                cell(model, budget, opt, guid, seed, {**settings, "trials": settings["trials_b"]})
    if "C" in phases:
        opt, guid = winner(pd.DataFrame(rows))
        sel = settings["selection_c"]
        log(f"(C) {variant(opt, guid)} scored on {sel} selection images")
        for model, budget in CELLS_C:  # ResNet-20's three seeds first: the cheaper cells give the first interval
            trials_c = settings["trials"] if model == "resnet20" else settings["trials_b"]
            for seed in seeds:
                cell(
                    model,
                    budget,
                    opt,
                    guid,
                    seed,
                    {**settings, "trials": trials_c, "selection": sel},
                    variant(opt, guid, sel),
                )


def winner(df: pd.DataFrame) -> tuple[str, str]:
    """The (A) variant with the lowest mean validation KL of its searched plans (training images only)."""
    a = df[
        (df.model == "resnet20")
        & (df.budget == 0.9)
        & (df.plan == "search")
        & (df.split == "validation")
        & (df.repair == CHANNEL_REPAIR)
    ]
    table = a.pivot_table(index="seed", columns=["optimizer", "guidance"], values="kl")
    best = None
    for v in [k for k in VARIANTS_A if k in table]:  # pairwise, on the seeds both ran (variants may have fewer)
        if best is None:
            best = v
            continue
        both = table[[best, v]].dropna()
        if len(both) and both[v].mean() < both[best].mean():
            best = v
    return str(best[0]), str(best[1])


# ----------------------------------------------------------------- summary
def _paired(a: pd.Series, b: pd.Series, scale: float = 1.0) -> str:
    d = (a - b).dropna() * scale
    if not len(d):
        return ""
    m, h, _ = t_interval(d.values)
    return f"{m:+.2f} ± {h:.2f}" if not np.isnan(h) else f"{m:+.2f}"


def _pivot(df: pd.DataFrame, plan: str, split: str, metric: str) -> pd.Series:
    return df[(df.plan == plan) & (df.split == split)].set_index("seed")[metric]


def _test_margins(g: pd.DataFrame) -> dict[str, str]:
    """Test top-1 of the searched and the returned plan minus global magnitude, paired by seed."""
    glob = _pivot(g, "global", "test", "top1")
    return {
        f"test top-1 {plan} - global": _paired(_pivot(g, plan, "test", "top1"), glob, 100)
        for plan in ("search", "returned")
    }


def _search_cost(g: pd.DataFrame) -> dict[str, str]:
    """How often the validation check fell back, minutes per search, candidates (trials) per minute."""
    cells = g.drop_duplicates("seed")
    return {
        "fallback fired": f"{int(cells.fallback.astype(bool).sum())}/{len(cells)}",
        "min / search": f"{cells.search_seconds.mean() / 60:.1f}",
        "candidates / min": f"{(60 * cells.trials / cells.search_seconds).mean():.1f}",
    }


def baselines(model: str, budget: float) -> pd.DataFrame:
    """Committed test top-1 (%) of the baselines under the channel-wise repair, by seed."""
    if not BASELINE_CSV.exists():
        return pd.DataFrame()
    b = pd.read_csv(BASELINE_CSV)
    b = b[
        (b.model == model)
        & (b.budget == budget)
        & (b.repair == CHANNEL_REPAIR)
        & (b.split == "test")
        & b.allocator.isin(["uniform", "global", "lamp", "erk"])
    ]
    return b.pivot_table(index="seed", columns="allocator", values="top1") * 100


def summarise(out: Path, settings: dict[str, Any], command: str, machine: str, quick: bool) -> str:
    every = pd.read_csv(out / "cells.csv")
    df = every[every.repair == CHANNEL_REPAIR]
    transfer = every[every.repair == RECONSTRUCT_REPAIR]
    trials = pd.read_csv(out / "trials.csv")
    lines = [
        f"# Allocation search{' (QUICK SMOKE RUN: not a result)' if quick else ''}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}.",
        "",
        f"Repair in the loop and for every number here: `{CHANNEL_REPAIR}` (channel-wise default). "
        f"Calibration {settings['calib']} / selection {settings['selection']} / validation "
        f"{settings['validation']} training images per calibration seed (disjoint, one permutation); test = "
        f"{int(df[df.split == 'test'].n.iloc[0])} CIFAR-10 test images, reporting only. "
        f"{settings['trials']} trials (evaluations) per search in (A), {settings['trials_b']} (the configs' "
        "default) in (B); evo screens each child on a seeded random "
        "quarter of the selection split. Intervals: 95% t over seeds, paired by seed.",
        "",
    ]
    a = df[(df.model == "resnet20") & (df.budget == 0.9) & ~df.variant.str.contains("-sel")]
    if len(a):
        lines += [
            "## (A) Optimiser x RR guidance, ResNet-20 at 0.9",
            "",
            "Selection / validation: mean KL to the dense logits of the searched plan (lower is better) and "
            "its paired difference to global magnitude. Test: top-1 (%) of the searched plan minus global "
            "magnitude, and of the *returned* plan (global magnitude when the validation check fails).",
            "",
        ]
        rows = []
        for v, g in a.groupby("variant", sort=False):
            row = {"variant": v, "seeds": g.seed.nunique()}
            for split in ("selection", "validation"):
                s = _pivot(g, "search", split, "kl")
                row[f"{split} KL"] = f"{s.mean():.3f}"
                row[f"{split} KL - global"] = _paired(s, _pivot(g, "global", split, "kl"))
            row.update(_test_margins(g))
            row.update(_search_cost(g))
            cells = g.drop_duplicates("seed")
            row["screened out"] = f"{cells.pruned.mean():.0f}/{cells.trials.mean():.0f}"
            rows.append(row)
        lines += [pd.DataFrame(rows).to_markdown(index=False), ""]
        ev = a[a.optimizer == "evo"]
        if set(ev.guidance) >= {"rr", "none"}:
            g_on, g_off = ev[ev.guidance == "rr"], ev[ev.guidance == "none"]
            lines += [
                "### RR-guidance ablation (evo, same seeds and evaluations)",
                "",
                "RR guidance minus none, paired by seed: selection KL "
                f"{_paired(_pivot(g_on, 'search', 'selection', 'kl'), _pivot(g_off, 'search', 'selection', 'kl'))}"
                ", validation KL "
                f"{_paired(_pivot(g_on, 'search', 'validation', 'kl'), _pivot(g_off, 'search', 'validation', 'kl'))}"
                ", test top-1 "
                f"{_paired(_pivot(g_on, 'search', 'test', 'top1'), _pivot(g_off, 'search', 'test', 'top1'), 100)}"
                " points (negative KL: guidance helps).",
                "",
            ]
    lines += _section_c(df)
    rows = []
    for (model, budget, v), g in df.groupby(["model", "budget", "variant"], sort=False):
        base = baselines(model, budget)
        glob = _pivot(g, "global", "test", "top1") * 100
        ret = _pivot(g, "returned", "test", "top1") * 100
        srch = _pivot(g, "search", "test", "top1") * 100
        row = {
            "model": model,
            "budget": f"{budget:g}",
            "variant": v,
            "seeds": len(glob),
            "global (rerun)": f"{glob.mean():.1f}",
            "search": f"{srch.mean():.1f}",
            "returned": f"{ret.mean():.1f}",
            "returned - global": _paired(ret, glob),
            "search - global": _paired(srch, glob),
        }
        if len(base):
            others = [c for c in ("uniform", "lamp", "erk") if c in base]
            best = max(others + ["global"], key=lambda c: (glob if c == "global" else base[c]).mean())
            ref = glob if best == "global" else base[best]
            row["best baseline"] = f"{best} {ref.mean():.1f}"
            row["returned - best baseline"] = _paired(ret, ref)
            if "global" in base:
                row["global rerun = committed"] = bool(
                    np.allclose(glob.sort_index().values, base["global"].reindex(glob.index).values)
                )
        cells = g.drop_duplicates("seed")
        row["fallback fired"] = f"{int(cells.fallback.astype(bool).sum())}/{len(cells)}"
        rows.append(row)
    lines += [
        "## Test top-1 (%) by model and budget: the search against the baselines",
        "",
        "`search`: the searched plan; `returned`: what the tool returns (global magnitude when the "
        "validation check fails). Margins paired by seed, mean ± 95% half-width. Best baseline: the "
        "highest mean test top-1 of uniform / global / LAMP / ERK under the same repair (committed rows of "
        "allocation_comparison.py; global rerun here).",
        "",
        pd.DataFrame(rows).to_markdown(index=False),
        "",
    ]
    if len(transfer):
        rows = []
        for (model, budget, v), g in transfer.groupby(["model", "budget", "variant"], sort=False):
            row = {"model": model, "budget": f"{budget:g}", "variant": v, "seeds": g.seed.nunique()}
            for split in ("validation", "test"):
                row[f"{split} KL search - global"] = _paired(
                    _pivot(g, "search", split, "kl"), _pivot(g, "global", split, "kl")
                )
                row[f"{split} top-1 search - global"] = _paired(
                    _pivot(g, "search", split, "top1"), _pivot(g, "global", split, "top1"), 100
                )
            row["global test top-1"] = f"{100 * _pivot(g, 'global', 'test', 'top1').mean():.1f}"
            rows.append(row)
        lines += [
            f"## Transfer: the same plans verified under the reconstruction repair `{RECONSTRUCT_REPAIR}`",
            "",
            "The plans searched with the channel-wise repair in the loop, and global magnitude, each verified "
            "under the configs' reconstruction repair (the cells run with the check on, and only seeds "
            "whose searched plan differs from global magnitude).",
            "",
            pd.DataFrame(rows).to_markdown(index=False),
            "",
        ]
    plot_progress(trials, df, out / "search_progress.png")
    lines += ["![search progress](search_progress.png)", ""]
    notes = out / "notes.md"  # what ran and what did not, written by whoever ran the study (kept verbatim)
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    return "\n".join(lines)


def _section_c(df: pd.DataFrame) -> list[str]:
    """(C): the same search scored on a larger selection split, against itself on the smaller one."""
    c = df[df.variant.str.contains("-sel")]
    if not len(c):
        return []
    rows = []
    for (model, budget, v), g in c.groupby(["model", "budget", "variant"], sort=False):
        small = df[(df.model == model) & (df.budget == budget) & (df.variant == v.rsplit("-sel", 1)[0])]
        row = {
            "model": model,
            "budget": f"{budget:g}",
            "variant": v,
            "seeds": g.seed.nunique(),
            "selection images": int(g.selection_size.iloc[0]),
        }
        for split in ("selection", "validation"):
            row[f"{split} KL - global"] = _paired(_pivot(g, "search", split, "kl"), _pivot(g, "global", split, "kl"))
        row["test KL - global"] = _paired(_pivot(g, "search", "test", "kl"), _pivot(g, "global", "test", "kl"))
        row.update(_test_margins(g))
        row["test top-1 search - (A)/(B) search"] = _paired(
            _pivot(g, "search", "test", "top1"), _pivot(small, "search", "test", "top1"), 100
        )
        row.update(_search_cost(g))
        rows.append(row)
    return [
        "## (C) A larger selection split",
        "",
        "The winner of (A) scored on more selection images (the validation split, drawn after it, holds other "
        "images than in (A)/(B); every margin is paired with global magnitude on the cell's own splits, and "
        "with the same search on the smaller split on the shared test images).",
        "",
        pd.DataFrame(rows).to_markdown(index=False),
        "",
    ]


def plot_progress(trials: pd.DataFrame, df: pd.DataFrame, path: Path) -> None:
    """Best selection KL so far against trials, one line per cell, global magnitude's KL dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(trials.groupby(["model", "budget"], sort=False))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    colors = {}
    for ax, ((model, budget), t) in zip(axes[0], groups):
        for (v, seed), g in t.groupby(["variant", "seed"], sort=False):
            g = g.sort_values("number")
            best = g.kl.where(g.state == "COMPLETE").cummin().ffill()
            c = colors.setdefault(v, f"C{len(colors)}")
            ax.plot(g.number + 1, best, color=c, alpha=0.8, label=v if seed == g.seed.min() else None)
        glob = df[(df.model == model) & (df.budget == budget) & (df.plan == "global") & (df.split == "selection")]
        for kl in glob.drop_duplicates("seed").kl:
            ax.axhline(kl, color="k", ls="--", lw=0.7)
        ax.set(
            title=f"{model} at {budget:g} (dashed: global magnitude)", xlabel="trial", ylabel="best selection KL so far"
        )
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(args: Any, machine: str, command: str) -> None:
    out = Path(args.out) if args.out else OUT
    settings = {
        "trials": args.search_trials,
        "trials_b": args.search_trials_b,
        "calib": 1024,
        "transfer": not args.search_no_transfer,
        "selection": args.search_selection,
        "validation": args.search_validation,
        "selection_c": args.search_selection_c,
    }
    seeds = args.seeds
    if args.quick:
        out = out.with_name(out.name + "_quick")
        settings.update(
            trials=6,
            trials_b=6,
            calib=256,
            selection=256,
            validation=256,
            selection_c=512,
            overrides={"calib_size": 256, "eval_size": 500},
        )
        seeds = seeds[:2]
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarise:
        log_path = out / "run.log"

        def log(msg: str) -> None:
            print(msg, flush=True)
            with open(log_path, "a") as f:
                f.write(msg + "\n")

        if args.search_transfer_only:
            run_transfer(settings, out, log, args.search_transfer_only)
        else:
            run(settings, seeds, out, log, args.search_phases)
    write_text_atomic(out / "summary.md", summarise(out, settings, command, machine, args.quick))
    print((out / "summary.md").read_text())
