"""Search under the reconstruction repair, scored through the level database: input rules, speed, margins.

Two parts (CIFAR ResNets from ``shared/``, every plan verified with ``obs>bn>naive@block+logits``):

``--part rules``: how each layer's database inputs are formed. At one budget and seed, random candidates
near global magnitude (1-6 level moves from it, inside the budget band) are scored stitched under each
input rule and by the full sequential pipeline on the same per-layer counts (selection-split KL); the
Spearman rank correlation says which rule predicts the pipeline. The same run times the database build,
stitched candidates against full ``obs``-in-the-loop candidates at equal selection size, and the stitched
scores with values stored in float16.

``--part compare``: per model, budget and calibration seed, the level search (``--allocator optuna``,
evo, anchor inputs, ``--profile-repair obs`` guidance, validation check on 1024 training images) against
global magnitude, uniform, LAMP, ERK and rr-greedy on the ``obs`` profile; test top-1 (reporting only),
paired by seed with 95% intervals. ``--guidance none`` repeats the search without RR guidance;
``--level-inputs off`` is the reference arm: the same level search, every candidate scored through the full
sequential pipeline instead of stitched from the database.

    python studies/level_search.py --part rules --models resnet20              # ~20 min here
    python studies/level_search.py --part compare --models resnet20 --budgets 0.9 0.95 --seeds 0 1 2

Outputs (studies/results/level_search/): rules.csv, rules.md; compare.csv, compare.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd
from common import ROOT, add_common_args, machine, model_config, run_main, shared_dir, t_interval

from rr_alloc import evidence
from rr_alloc.allocators import round_to_budget
from rr_alloc.api import allocate, verify
from rr_alloc.plans.report import write_frame_csv
from rr_alloc.search.databases import level_database
from rr_alloc.search.level_space import LevelSpace
from rr_alloc.search.optimizers import trial_counts
from rr_alloc.search.scoring import SelectionScorer
from rr_alloc.search.stitched import StitchedScorer
from rr_alloc.session import Session
from rr_alloc.system.files import write_text_atomic

OUT = ROOT / "studies" / "results" / "level_search"
REPAIR = "obs>bn>naive@block+logits"
BASELINES = ("global", "uniform", "lamp", "erk", "rr-greedy")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def candidates(session: Session, db, budget: float, n: int, seed: int) -> list[np.ndarray]:
    """``n`` distinct level vectors near global magnitude (1-6 unguided level moves, inside the band)."""
    problem = evidence.problem(session, budget)
    glob = allocate(session, "global", budget).counts
    ladders = [db.counts[name] for name in problem.names]
    anchor = np.array([db.level_of(name, glob[name]) for name in problem.names])
    space = LevelSpace(problem, ladders, anchor, guided=False)
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    while len(out) < n:
        lv = space.child(anchor, rng, int(rng.integers(0, 4)))
        if tuple(lv) not in seen and not np.array_equal(lv, anchor):
            seen.add(tuple(lv))
            out.append(lv)
    return out


def part_rules(args) -> None:
    from scipy import stats

    model, budget = args.models[0], args.budgets[0]
    session = Session(model_config(model, seed=args.seeds[0], repair=REPAIR, cache=False), progress=False)
    glob = allocate(session, "global", budget).counts
    names = [layer.name for layer in session.layers]
    dbs, rows = {}, []
    for rule in args.rules:
        t0 = time.perf_counter()
        dbs[rule] = level_database(session, glob, rule)
        log(f"{rule}: database built in {time.perf_counter() - t0:.1f} s, {dbs[rule].meta}")
    cands = candidates(session, dbs[args.rules[0]], budget, args.candidates, args.seeds[0])
    full_scorer = SelectionScorer(session, REPAIR)
    r0 = args.rules[0]
    staged = StitchedScorer(session, REPAIR, dbs[r0])
    base = staged.score_levels(staged.all_levels(dbs[r0].levels_of(glob)))  # global magnitude's stage means
    t_full = t_stitched = 0.0
    for c, lv in enumerate(cands):
        counts = {name: int(dbs[args.rules[0]].counts[name][v]) for name, v in zip(names, lv)}
        t0 = time.perf_counter()
        full = full_scorer(counts)
        t_full += time.perf_counter() - t0
        row = {"candidate": c, "full": full}
        row["sparsity"] = session.achieved(counts)
        for rule, db in dbs.items():
            sc = StitchedScorer(session, REPAIR, db)
            levels = sc.all_levels({name: db.level_of(name, counts[name]) for name in names})
            t0 = time.perf_counter()
            r = sc.score_levels(levels)
            row[rule] = r.full
            if rule == r0:
                t_stitched += time.perf_counter() - t0
                for i, m in enumerate(r.stages):  # does stage i decide as the full score does (vs global)?
                    row[f"stage{i + 1}_beats_global"] = m <= base.stages[i]
                row["full_beats_global"] = r.full <= base.full
                half = _half(db)
                row[f"{rule}_fp16"] = StitchedScorer(session, REPAIR, half).score_levels(levels).full
        rows.append(row)
        log(f"candidate {c}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
    df = pd.DataFrame(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    write_frame_csv(df, OUT / f"rules_{model}.csv")
    n = len(df)
    lines = [
        f"# Level database input rules: {model} at {budget}, seed {args.seeds[0]}, {n} candidates",
        "",
        f"`python studies/level_search.py --part rules --models {model} --budgets {budget}` on {machine()}.",
        "Candidates: 1-6 unguided level moves from global magnitude inside the budget band; scores are the "
        "selection-split KL (1024 training images) of the stitched candidate and of the full sequential "
        f"pipeline `{REPAIR}` on the same per-layer counts.",
        "",
        "| input rule | Spearman rho vs full | mean abs error (KL) | build s | levels | passes | MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule, db in dbs.items():
        rho = stats.spearmanr(df[rule], df["full"]).statistic
        err = float((df[rule] - df["full"]).abs().mean())
        m = db.meta
        lines.append(
            f"| {rule} | {rho:.3f} | {err:.4f} | {m['build_seconds']:.1f} | {m['levels']} | {m['passes']} | "
            f"{m['megabytes']:.1f} |"
        )
    stage_lines = []
    for i, size in enumerate(staged.sizes):
        col = df[f"stage{i + 1}_beats_global"]
        agree = float((col == df.full_beats_global).mean())
        lost = int((~col & df.full_beats_global).sum())
        stage_lines.append(f"| {size} | {agree:.2f} | {lost} of {int(df.full_beats_global.sum())} |")
    rho16 = stats.spearmanr(df[f"{r0}_fp16"], df[r0]).statistic
    d16 = float((df[f"{r0}_fp16"] - df[r0]).abs().max())
    lines += [
        "",
        f"Values in float16 ({r0} rule): Spearman rho {rho16:.4f} against float32, largest KL change {d16:.2e}.",
        "",
        f"Speed at equal selection size (1024 images): a full `obs`-in-the-loop candidate {t_full / n:.1f} s, "
        f"a stitched candidate {t_stitched / n:.1f} s: **{t_full / max(t_stitched, 1e-9):.1f}x** "
        f"(same run). Database build ({r0} rule): {dbs[r0].meta['build_seconds']:.1f} s.",
        "",
        f"Staged selection ({r0} rule, candidate against global magnitude on the same images): how often a stage's "
        "decision equals the full split's, and the candidates that beat global magnitude on all 1024 images but "
        "a stage would have stopped.",
        "",
        "| stage images | agrees with full | better in full, stopped |",
        "|---|---|---|",
        *stage_lines,
    ]
    write_text_atomic(OUT / f"rules_{model}.md", "\n".join(lines) + "\n")
    log("\n".join(lines))


def _half(db):
    import copy

    import torch

    h = copy.copy(db)
    h.values = {n: [v.to(torch.float16).to(torch.float32) for v in vs] for n, vs in db.values.items()}
    return h


def part_compare(args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    csv = OUT / f"compare{args.tag}.csv"
    if args.summarise:  # the table of the cells in the CSV (e.g. of a run stopped before its last cell)
        summarize(pd.read_csv(csv), args)
        return
    for model in args.models:
        for budget in args.budgets:
            for seed in args.seeds:
                rows += compare_cell(args, model, budget, seed)
                write_frame_csv(pd.DataFrame(rows), csv)
    summarize(pd.DataFrame(rows), args)


def compare_cell(args, model: str, budget: float, seed: int) -> list[dict]:
    storage = OUT / f"optuna{args.tag}.db"
    cfg = model_config(
        model,
        seed=seed,
        repair=REPAIR,
        allocator="optuna",
        n_trials=args.trials,
        profile_repair="obs",
        validation_size=1024,
        guidance=args.guidance,
        level_inputs=args.level_inputs,
        storage=f"sqlite:///{storage}",
        study_name=f"{model}-b{budget}-s{seed}-{args.guidance}{args.tag}",
    )
    session = Session(cfg, progress=False)
    t0 = time.perf_counter()
    searched = allocate(session, "optuna", budget)
    returned = searched.counts
    t_search = time.perf_counter() - t0
    prov = searched.search.to_dict()
    problem = evidence.problem(session, budget)
    best = round_to_budget(problem, np.asarray(trial_counts(_best(searched.study)), float) / problem.n)
    plans = {"search": {layer.name: int(k) for layer, k in zip(session.layers, best)}, "returned": returned}
    for b in args.baselines:
        plans[b] = allocate(session, b, budget).counts
    out, verified = [], {}
    for label, counts in plans.items():
        same = next((k for k, v in plans.items() if k in verified and v == counts), None)
        ms = verified[same] if same else verify(session, counts, REPAIR, ("selection", "test")).metrics
        verified[label] = ms
        for split, m in ms.items():
            out.append(
                {
                    "model": model,
                    "budget": budget,
                    "seed": seed,
                    "guidance": args.guidance,
                    "level_inputs": args.level_inputs,
                    "plan": label,
                    "split": split,
                    "top1": m.top1,
                    "kl": m.kl,
                    "sparsity": session.achieved(counts),
                    "search_seconds": t_search,
                    "trials": prov["trials"],
                    "complete": prov["complete"],
                    "fallback": prov.get("fallback"),
                    "validation_diff": prov.get("validation_diff"),
                    "db_seconds": prov.get("database", {}).get("build_seconds"),
                }
            )
        log(f"{model} b={budget} seed {seed} {label:<9} test top1 {100 * ms['test'].top1:5.2f}")
    log(
        f"{model} b={budget} seed {seed}: search {t_search:.0f} s, {prov['trials']} trials, fallback {prov['fallback']}"
    )
    return out


def _best(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    return min(done, key=lambda t: t.value)


def summarize(df: pd.DataFrame, args) -> None:
    test = df[df.split == "test"]
    lines = [
        "# Level search under reconstruction: searched plan vs the baselines, all verified with " + REPAIR,
        "",
        f"`python studies/level_search.py --part compare --models {' '.join(args.models)} --budgets "
        f"{' '.join(map(str, args.budgets))} --seeds {' '.join(map(str, args.seeds))} --trials {args.trials} "
        f"--guidance {args.guidance} --level-inputs {args.level_inputs}"
        f"{' --baselines ' + ' '.join(args.baselines) if list(args.baselines) != list(BASELINES) else ''}"
        f"{' --tag ' + args.tag if args.tag else ''}` "
        f"on {machine()}.",
        "Test top-1 (10,000 CIFAR-10 test images, reporting only) in %, mean ± 95% t-interval over seeds; "
        "`search` is the search's best plan before the validation check, `returned` what `search` writes "
        "(global magnitude when the check rejects the searched plan). Differences are paired by seed.",
        "",
        "| model | budget | "
        + " | ".join(["search", "returned", *args.baselines])
        + " | search - global | search - best baseline | fallbacks | seeds | search min |",
        "|---|---|" + "---|" * (len(args.baselines) + 7),
    ]
    for (model, budget), g in test.groupby(["model", "budget"]):
        piv = g.pivot_table(index="seed", columns="plan", values="top1") * 100
        cells = []
        for p in ["search", "returned", *args.baselines]:
            m, h, _ = t_interval(piv[p])
            cells.append(f"{m:.2f} ± {h:.2f}")
        m, h, _ = t_interval(piv["search"] - piv["global"])
        best_base = piv[list(args.baselines)].mean().idxmax()
        mb, hb, _ = t_interval(piv["search"] - piv[best_base])
        fb = g.drop_duplicates("seed").fallback.astype(bool).sum()
        mins = g.drop_duplicates("seed").search_seconds.mean() / 60
        lines.append(
            f"| {model} | {budget} | " + " | ".join(cells) + f" | {m:+.2f} ± {h:.2f} | {mb:+.2f} ± {hb:.2f} "
            f"({best_base}) | {fb}/{len(piv)} | {' '.join(map(str, piv.index))} | {mins:.1f} |"
        )
    write_text_atomic(OUT / f"compare{args.tag}.md", "\n".join(lines) + "\n")
    log("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--part", choices=("rules", "compare"), required=True)
    p.add_argument("--budgets", nargs="+", type=float, default=[0.9])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rules", nargs="+", default=["anchor", "dense", "uniform"])
    p.add_argument("--candidates", type=int, default=30)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--guidance", default="rr", choices=("rr", "none"))
    p.add_argument("--level-inputs", default="anchor", choices=("anchor", "dense", "uniform", "off"))
    p.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=BASELINES)
    p.add_argument("--summarise", action="store_true", help="rebuild the table from the CSV and stop")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    if "global" not in args.baselines:
        p.error("--baselines must include global: the margins are over global magnitude")
    shared_dir(args.shared)
    (part_rules if args.part == "rules" else part_compare)(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
