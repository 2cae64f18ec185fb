"""Which repair pipeline should verify plans (and what ASR adds over BN only)?

Stage 1 screens every repair method x site x order x mean-shift combination on
the *selection* split (training images, seed 0) for CIFAR ResNet-20/32 pruned
by global magnitude at 0.8/0.9/0.95 and by N:M 2:4. The default pipeline is
the stage-1 winner (mean selection top-1 over all settings). Stage 2 reruns
the best pipelines plus ``none`` and ``bn`` with 3 calibration seeds and
reports *test* top-1 with 95% intervals -- reporting only, nothing is chosen
from it.

    python studies/repair_ablation.py                 # full study (~50 min stage 1 + ~15 min stage 2, 2 cores)
    python studies/repair_ablation.py --reuse-stage1  # stage 2 only, from the committed stage1.csv
    python studies/repair_ablation.py --quick         # smoke run, separate output folder
    python studies/repair_ablation.py --reconstruct   # reconstruction repair (lsq / obs), ~1 h on 2 cores

Outputs (studies/results/repair_ablation/): stage1.csv, stage2.csv, summary.md, repair_ablation.png;
with --reconstruct: reconstruct_screen.csv, reconstruct_test.csv, reconstruct_alloc.csv, reconstruct.md.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import ROOT, UserError, add_common_args, machine, model_config, run_main, shared_dir, t_interval

from rr_alloc.api import allocate, verify
from rr_alloc.nn.pruning import Pruning
from rr_alloc.plans.report import save_figure, write_frame_csv
from rr_alloc.repair import CHANNEL_REPAIR
from rr_alloc.session import Session
from rr_alloc.system.files import write_text_atomic

METHODS = ("lw", "naive", "asr")
SITE_SETS = ("conv", "bn", "block", "logits", "block+logits")
PRUNINGS = ("global@0.8", "global@0.9", "global@0.95", "nm2:4")


def stage1_pipelines() -> tuple[list[str], list[str]]:
    """Every combination that makes sense, and the ones left out with the reason."""
    pipes, excluded = ["none", "bn"], []
    for method, sites, pre, shift in itertools.product(METHODS, SITE_SETS, (True, False), (True, False)):
        step = f"{method}@{sites}" + ("" if shift else ":noshift")
        pipe = f"{step}>bn" if pre else f"bn>{step}"
        if sites == "conv" and pre and not shift:
            # BN recalibration re-estimates the mean of a conv output that feeds it: the shift is erased,
            # so this is identical to the shifted variant
            excluded.append(f"{pipe}: identical to {method}@conv>bn (recalibration re-estimates the mean)")
            continue
        pipes.append(pipe)
    for sites in SITE_SETS:  # second lambda rule for ASR, in the order that keeps corrections
        pipes.append(f"bn>asr@{sites}:lam=median")
    excluded.append(
        "asr:lam=median before BN recalibration: not screened (time budget); the mean rule's "
        "pre-BN rows show what recalibration leaves of a pre-BN correction"
    )
    return pipes, excluded


def pruning_of(session: Session, name: str) -> Pruning:
    """``global@B``: global-magnitude counts at budget B; ``nm2:4``: the 2:4 pattern on every layer."""
    if name.startswith("global@"):
        return Pruning(counts=allocate(session, "global", float(name.split("@")[1])).counts)
    return Pruning(nm=(2, 4), layers=tuple(layer.name for layer in session.layers))


def run_stage(models, prunings, pipes, seeds, split, overrides, log) -> pd.DataFrame:
    rows = []
    for model in models:
        for seed in seeds:
            session = Session(model_config(model, seed=seed, **overrides), progress=False)
            dense = session.dense_metrics(split)
            for pr in prunings:
                pruning = pruning_of(session, pr)
                for pipe in pipes:
                    t0 = time.perf_counter()
                    m = verify(session, pruning, pipe, splits=(split,))[split]
                    rows.append(
                        {
                            "model": model,
                            "seed": seed,
                            "pruning": pr,
                            "repair": pipe,
                            "split": split,
                            "n": m.n,
                            "top1": m.top1,
                            "agreement": m.agreement,
                            "kl": m.kl,
                            "dense_top1": dense.top1,
                            "seconds": time.perf_counter() - t0,
                        }
                    )
                    log(
                        f"{model} seed {seed} {pr:<12} {pipe:<40} top1 {100 * m.top1:5.1f}  "
                        f"({time.perf_counter() - t0:.1f}s)"
                    )
    return pd.DataFrame(rows)


def summarise(s1: pd.DataFrame, s2: pd.DataFrame, default: str, excluded: list[str], args, runtime: float) -> str:
    lines = [
        f"# Repair ablation{' (QUICK SMOKE RUN: not a result)' if args.quick else ''}",
        "",
        f"Command: `python studies/repair_ablation.py{' --quick' if args.quick else ''}`  ",
        f"Machine: {machine()}; runtime {runtime / 60:.1f} min.  ",
        f"Data: CIFAR-10 JPEG (`shared/data/cifar10-jpeg`), calibration "
        f"{args.calib} and selection {args.selection} images drawn from `train-10k`; "
        f"test = {int(s2.n.iloc[0])} test images (reporting only).",
        "",
        "## Stage 1: screen on the selection split (seed 0)",
        "",
        f"{s1.repair.nunique()} pipelines x {s1.pruning.nunique()} prunings x {s1.model.nunique()} models. "
        "Ranked by mean selection top-1 over all (model, pruning) settings; the top 15:",
        "",
    ]
    piv = s1.pivot_table(index="repair", columns=["model", "pruning"], values="top1").mul(100)
    piv["mean"] = piv.mean(axis=1, numeric_only=True)
    piv = piv.sort_values("mean", ascending=False)
    flat = piv.copy()
    flat.columns = [c if isinstance(c, str) else f"{c[0]} {c[1]}" for c in flat.columns]
    lines.append(flat.head(15).round(1).to_markdown())
    lines += (
        [
            "",
            f"Reference rows: `none` mean {piv.loc['none', 'mean']:.1f}, `bn` mean {piv.loc['bn', 'mean']:.1f} "
            f"(rank {list(piv.index).index('bn') + 1} of {len(piv)}).",
            "",
            f"**Default pipeline (stage-1 winner): `{default}`.**",
            "",
            "Excluded combinations:",
            "",
        ]
        + [f"- {e}" for e in excluded]
        + ["", "## Stage 2: test top-1 (%), mean over calibration seeds with 95% t-interval", ""]
    )
    seeds = [int(s) for s in sorted(s2.seed.unique())]
    n_test = int(s2.n.iloc[0])
    rows = []
    for (model, pr, rep), g in s2.groupby(["model", "pruning", "repair"]):
        m, half, _ = t_interval(100 * g.top1.values)
        rows.append({"model": model, "pruning": pr, "repair": rep, "cell": f"{m:.1f} ± {half:.1f}", "mean": m})
    t = pd.DataFrame(rows)
    order = list(dict.fromkeys(["none", "bn"] + [r for r in piv.index if r in set(t.repair)]))
    wide = t.pivot_table(index="repair", columns=["model", "pruning"], values="cell", aggfunc="first").reindex(order)
    wide.columns = [f"{a} {b}" for a, b in wide.columns]
    lines += [
        f"Seeds {seeds}; each cell mean ± half-width over seeds (t, {len(seeds) - 1} d.o.f.); "
        f"a single seed's binomial 95% interval on {n_test} images is at most "
        f"±{196 * (0.25 / n_test) ** 0.5:.1f} points.",
        "",
        wide.to_markdown(),
        "",
    ]
    return "\n".join(lines)


def plot(s2: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted(s2.model.unique())
    prunings = [p for p in PRUNINGS if p in set(s2.pruning)]
    fig, axes = plt.subplots(len(models), 1, figsize=(12, 4 * len(models)), squeeze=False)
    reps = list(dict.fromkeys(s2.repair))
    for ax, model in zip(axes[:, 0], models):
        width = 0.8 / len(reps)
        for j, rep in enumerate(reps):
            means, halves = [], []
            for pr in prunings:
                g = s2[(s2.model == model) & (s2.pruning == pr) & (s2.repair == rep)]
                m, h, _ = t_interval(100 * g.top1.values)
                means.append(m)
                halves.append(0 if np.isnan(h) else h)
            ax.bar(np.arange(len(prunings)) + j * width, means, width, yerr=halves, label=rep, capsize=2)
        ax.set_xticks(np.arange(len(prunings)) + 0.4 - width / 2, prunings)
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"CIFAR-10 {model}: repair pipelines (mean over seeds, 95% t-interval)")
    axes[0, 0].legend(fontsize=7, ncol=3)
    save_figure(fig, path)
    plt.close(fig)


# ------------------------------------------------------------ reconstruction (lsq / obs repair)
DAMPS = (1e-3, 1e-2, 1e-1)
AFTER = CHANNEL_REPAIR  # the channel-wise pipeline runs after the re-fit


def _rows_for(model, seed, pr, pipe, plan, ms, seconds, dense) -> list[dict]:
    return [
        {
            "model": model,
            "seed": seed,
            "pruning": pr,
            "plan": plan,
            "repair": pipe,
            "split": split,
            "n": m.n,
            "top1": m.top1,
            "agreement": m.agreement,
            "kl": m.kl,
            "dense_top1": dense[split].top1,
            "seconds": seconds,
        }
        for split, m in ms.items()
    ]


def run_reconstruct(args, models, out: Path, log) -> None:
    """Screen damping x {lsq, obs} (selection, seed 0, global@0.9), then the best of each on test with 3
    seeds at every pruning, then rr-greedy on the lsq profile vs global under the best lsq pipeline."""
    overrides = {"calib_size": 256, "selection_size": 256, "eval_size": 1000} if args.quick else {}
    prunings = ["global@0.9", "nm2:4"] if args.quick else list(args.prunings or PRUNINGS)
    screen, test, alloc = [], [], []
    # 1. screen on the selection split (or reuse a screen already written, e.g. by a run of the other model)
    if args.reuse_screen:
        if not Path(args.reuse_screen).is_file():
            raise UserError(f"--reuse-screen: no such file {args.reuse_screen}: pass a reconstruct_screen.csv")
        screen = pd.read_csv(args.reuse_screen).to_dict("records")
        log(f"reusing the screen in {args.reuse_screen} ({len(screen)} rows)")
    for model in [] if args.reuse_screen else models:
        session = Session(model_config(model, seed=0, **overrides), progress=False)
        dense = {"selection": session.dense_metrics("selection")}
        counts = allocate(session, "global", 0.9).counts
        for method in ("lsq", "obs"):
            for damp in DAMPS:
                pipe = f"{method}:damp={damp:g}>{AFTER}"
                t0 = time.perf_counter()
                ms = verify(session, counts, pipe, ("selection",)).metrics
                screen += _rows_for(model, 0, "global@0.9", pipe, "global", ms, time.perf_counter() - t0, dense)
                write_frame_csv(pd.DataFrame(screen), out / "reconstruct_screen.csv")
                log(
                    f"screen {model} {pipe:<40} selection top1 {100 * ms['selection'].top1:5.1f} "
                    f"kl {ms['selection'].kl:.3f} ({time.perf_counter() - t0:.1f}s)"
                )
    sc = pd.DataFrame(screen)
    rank = sc.groupby("repair").kl.mean().sort_values()
    best = {m: next(r for r in rank.index if r.startswith(m + ":")) for m in ("lsq", "obs")}
    log(f"best by mean selection KL: {best}")
    # 2. the best lsq and obs pipelines: every pruning, 3 seeds, selection + test
    # 3. rr-greedy on the lsq profile vs global, both under the best lsq pipeline, at 0.9
    lsq_damp = float(best["lsq"].split(":damp=")[1].split(">")[0])
    for model in models:
        for seed in args.seeds:
            session = Session(
                model_config(model, seed=seed, profile_repair=f"lsq:damp={lsq_damp:g}", **overrides), progress=False
            )
            dense = {s: session.dense_metrics(s) for s in ("selection", "test")}
            for pr in prunings:
                pruning = pruning_of(session, pr)
                for pipe in best.values():
                    t0 = time.perf_counter()
                    ms = verify(session, pruning, pipe, ("selection", "test")).metrics
                    test += _rows_for(
                        model, seed, pr, pipe, "global" if pr != "nm2:4" else "nm", ms, time.perf_counter() - t0, dense
                    )
                    write_frame_csv(pd.DataFrame(test), out / "reconstruct_test.csv")
                    log(
                        f"test {model} seed {seed} {pr:<11} {pipe:<40} test top1 {100 * ms['test'].top1:5.1f} "
                        f"({time.perf_counter() - t0:.1f}s)"
                    )
            for plan in () if args.no_alloc else ("global", "rr-greedy"):
                t0 = time.perf_counter()
                counts = allocate(session, plan, 0.9).counts
                ms = verify(session, counts, best["lsq"], ("selection", "test")).metrics
                alloc += _rows_for(model, seed, "0.9", best["lsq"], plan, ms, time.perf_counter() - t0, dense)
                write_frame_csv(pd.DataFrame(alloc), out / "reconstruct_alloc.csv")
                log(f"alloc {model} seed {seed} {plan:<10} (lsq profile) test top1 {100 * ms['test'].top1:5.1f}")
    if not args.reuse_screen:
        write_text_atomic(
            out / "reconstruct.md", summarise_reconstruct(sc, pd.DataFrame(test), pd.DataFrame(alloc), best, out, args)
        )


def merge_reconstruct(args, dirs: list[str], out: Path) -> None:
    """One summary from the CSVs of several runs (e.g. one per model); written to ``out``."""
    parts = {k: [] for k in ("screen", "test", "alloc")}
    for d in dirs:
        for k in parts:
            f = Path(d) / f"reconstruct_{k}.csv"
            if f.is_file():
                parts[k].append(pd.read_csv(f))
    if not parts["screen"] or not parts["test"]:
        raise UserError(f"--merge-reconstruct: no reconstruct_screen.csv / reconstruct_test.csv in {dirs}")
    frames = {k: pd.concat(v, ignore_index=True).drop_duplicates() if v else pd.DataFrame() for k, v in parts.items()}
    sc = frames["screen"]
    rank = sc.groupby("repair").kl.mean().sort_values()
    best = {m: next(r for r in rank.index if r.startswith(m + ":")) for m in ("lsq", "obs")}
    for k, df in frames.items():
        write_frame_csv(df, out / f"reconstruct_{k}.csv")
    text = summarise_reconstruct(sc, frames["test"], frames["alloc"], best, out, args)
    write_text_atomic(out / "reconstruct.md", text)
    print(text)


def summarise_reconstruct(sc, test, alloc, best, out: Path, args) -> str:
    lines = [
        "# Reconstruction repair (lsq / obs)" + (" (QUICK SMOKE RUN: not a result)" if args.quick else ""),
        "",
        f"Command: `python studies/repair_ablation.py --reconstruct{' --quick' if args.quick else ''}`  ",
        f"Machine: {machine()}.",
        "",
        "## Screen: damping x {lsq, obs}, global magnitude at 0.9, seed 0, selection split",
        "",
        "Each pipeline is the re-fit followed by the channel-wise pipeline `" + AFTER + "`. "
        "Ranked by mean selection KL over the models (label-free); top-1 beside it.",
        "",
    ]
    piv = sc.pivot_table(index="repair", columns="model", values=["top1", "kl"])
    piv.columns = [f"{m} {v}" for v, m in piv.columns]
    piv["mean kl"] = sc.groupby("repair").kl.mean()
    for c in [c for c in piv.columns if c.endswith("top1")]:
        piv[c] = (100 * piv[c]).round(1)
    lines += [
        piv.sort_values("mean kl").round(3).to_markdown(),
        "",
        f"**Chosen: `{best['lsq']}` (lsq) and `{best['obs']}` (obs).**",
        "",
        "## Test top-1 (%), mean over calibration seeds ± 95% t-interval",
        "",
    ]
    base = out / "stage2.csv"
    rows = [test]
    if base.exists():  # the committed channel-wise rows, same seeds and images
        s2 = pd.read_csv(base)
        rows.append(s2[s2.repair.isin(["bn", AFTER])].assign(plan="global"))
    allr = pd.concat(rows, ignore_index=True)
    allr = allr[allr.split == "test"]
    cells = []
    for (model, pr, rep), g in allr.groupby(["model", "pruning", "repair"]):
        m, h, _ = t_interval(100 * g.top1.values)
        cells.append(
            {
                "model": model,
                "pruning": pr,
                "repair": rep,
                "cell": (f"{m:.1f} ± {h:.1f}" if not np.isnan(h) else f"{m:.1f}")
                + ("" if len(g) == 3 else f" ({len(g)} seed{'s' if len(g) > 1 else ''})"),
            }
        )
    wide = pd.DataFrame(cells).pivot_table(index="repair", columns=["model", "pruning"], values="cell", aggfunc="first")
    wide.columns = [f"{a} {b}" for a, b in wide.columns]
    order = [r for r in ["bn", AFTER, best["lsq"], best["obs"]] if r in wide.index]
    lines += [
        wide.reindex(order).to_markdown(),
        "",
        f"Rows `bn` and `{AFTER}` (the channel-wise pipeline) come from `stage2.csv` (same seeds, same "
        "10,000 test images).",
        "",
        "## Allocation for the re-fit: rr-greedy on the lsq profile vs global magnitude, at 0.9",
        "",
        f"Both verified under `{best['lsq']}`; paired by calibration seed (test top-1 points).",
        "",
    ]
    t = alloc[alloc.split == "test"]
    arows = []
    for model, g in t.groupby("model"):
        piv2 = (g.pivot_table(index="seed", columns="plan", values="top1") * 100).dropna()
        d = piv2["rr-greedy"] - piv2["global"]
        m, h, _ = t_interval(d.values)
        gm, gh, _ = t_interval(piv2["global"].values)
        rm, rh, _ = t_interval(piv2["rr-greedy"].values)
        sel = alloc[(alloc.split == "selection") & (alloc.model == model)].groupby("plan").kl.mean()
        arows.append(
            {
                "model": model,
                "global": f"{gm:.1f} ± {gh:.1f}",
                "rr-greedy (lsq profile)": f"{rm:.1f} ± {rh:.1f}",
                "rr-greedy - global": f"{m:+.1f} ± {h:.1f}",
                "selection KL global / rr": f"{sel.get('global', np.nan):.3f} / {sel.get('rr-greedy', np.nan):.3f}",
            }
        )
    lines += [pd.DataFrame(arows).to_markdown(index=False), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument(
        "--reuse-stage1",
        action="store_true",
        help="reuse the stage1.csv already in --out (same grid) and run stage 2 only",
    )
    ap.add_argument("--top", type=int, default=3, help="pipelines carried to stage 2 (besides none and bn)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--reconstruct",
        action="store_true",
        help="run the reconstruction (lsq / obs) study instead (see the module docstring)",
    )
    ap.add_argument("--prunings", nargs="+", choices=list(PRUNINGS), help="--reconstruct: prunings of stage 2")
    ap.add_argument("--reuse-screen", help="--reconstruct: take the damping screen from this CSV (skip it)")
    ap.add_argument("--no-alloc", action="store_true", help="--reconstruct: skip the rr-greedy vs global part")
    ap.add_argument(
        "--merge-reconstruct",
        nargs="+",
        metavar="DIR",
        help="summarise the --reconstruct CSVs of these folders into --out",
    )
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "repair_ablation"))
    args = ap.parse_args()
    shared_dir(args.shared)
    if args.merge_reconstruct:
        merge_reconstruct(args, args.merge_reconstruct, Path(args.out))
        return
    if args.reconstruct:
        out = Path(args.out)
        if args.quick:
            args.seeds = [0, 1]
            out = out.with_name(out.name + "_quick")
        run_reconstruct(args, args.models[:1] if args.quick else args.models, out, lambda msg: print(msg, flush=True))
        return
    t_start = time.perf_counter()
    pipes, excluded = stage1_pipelines()
    models, prunings, overrides = args.models, list(PRUNINGS), {}
    args.calib, args.selection = 1024, 1024
    out = Path(args.out)
    if args.quick:
        models, prunings, args.seeds, args.top = models[:1], ["global@0.9", "nm2:4"], [0, 1], 2
        pipes = ["none", "bn", "asr@conv>bn", "bn>asr@block+logits", "bn>lw@block+logits"]
        overrides = {"calib_size": 256, "selection_size": 256, "eval_size": 1000}
        args.calib, args.selection = 256, 256
        out = out.with_name(out.name + "_quick")

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.reuse_stage1 and (out / "stage1.csv").exists():
        s1 = pd.read_csv(out / "stage1.csv")
        if set(s1.repair) != set(pipes):
            raise SystemExit("error: stage1.csv holds another pipeline grid: rerun without --reuse-stage1")
        log(f"reusing {out / 'stage1.csv'} ({len(s1)} rows)")
    else:
        s1 = run_stage(models, prunings, pipes, [0], "selection", overrides, log)
        write_frame_csv(s1, out / "stage1.csv")
    rank = s1.groupby("repair").top1.mean().sort_values(ascending=False)
    default = rank.index[0]
    best = [r for r in rank.index if r not in ("none", "bn")][: args.top]
    s2 = run_stage(models, prunings, ["none", "bn"] + best, args.seeds, "test", overrides, log)
    write_frame_csv(s2, out / "stage2.csv")
    plot(s2, out / "repair_ablation.png")
    text = summarise(s1, s2, default, excluded, args, time.perf_counter() - t_start)
    write_text_atomic(out / "summary.md", text)
    print(text)


if __name__ == "__main__":
    run_main(main)
