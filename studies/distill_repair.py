"""The kd repair step on CIFAR ResNets: a screen of its settings, then the pipeline with and without it.

Parts (each writes ``studies/results/distill_repair<tag>/<part>.csv`` and ``<part>.md``, resuming from the CSV):

- ``screen``: ResNet-20 at 0.9, global magnitude counts, ``obs>bn>naive@block+logits`` once, then ``kd`` with each
  setting (learning rate, steps, loss, augmentation, parameters, images, place in the pipeline) on a copy.
  Settings are chosen on the *selection* split (KL to the dense logits); test top-1 is reported only.
- ``compare``: each model x budget (0.8, 0.9, 0.95, 2:4) x seed: ``obs>bn>naive@block+logits`` against the same
  followed by ``kd`` (one reconstruction serves both arms), test top-1 with Wilson intervals, paired differences
  over seeds, seconds of the step.
- ``alloc``: uniform, global, LAMP, ERK and rr-greedy (on the profile of the pipeline's reconstruction, ``obs``)
  at 0.9 and 0.95, each verified with and without ``kd``: does the best rule change under the stronger repair?

    python studies/distill_repair.py --part screen
    python studies/distill_repair.py --part compare --models resnet20 resnet32 --seeds 0 1 2
    python studies/distill_repair.py --part alloc --models resnet20 --budgets 0.9 0.95 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
import pandas as pd
import torch

from rr_alloc.api import allocate
from rr_alloc.evaluation import repaired_model
from rr_alloc.nn.metrics import compare_logits, logits_of
from rr_alloc.repair import RECONSTRUCT_REPAIR, DistillStep, RepairPipeline, distill
from rr_alloc.session import Session

BASE = RECONSTRUCT_REPAIR  # obs>bn>naive@block+logits
RULES = ("uniform", "global", "lamp", "erk", "rr-greedy")


def wilson(k: float, n: int) -> tuple[float, float]:
    from scipy import stats

    z = stats.norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def scores(session: Session, model: torch.nn.Module, splits: tuple[str, ...] = ("selection", "test")) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in splits:
        dense, labels = session.dense_logits(split)
        logits, _ = logits_of(model, session.split(split), session.device)
        m = compare_logits(logits, labels, dense)
        out[f"{split}_kl"], out[f"{split}_agreement"] = m.kl, m.agreement
        if split == "test":
            out["test_top1"] = m.top1
    return out


def open_session(model: str, seed: int, distill_size: int = 0, quick: bool = False, **extra: Any) -> Session:
    # the pipelines are passed explicitly below; the run's repair names kd so that --distill-size applies
    over: dict[str, Any] = {"seed": seed, "repair": BASE + ">kd", "distill_size": distill_size, **extra}
    if quick:
        over.update(calib_size=256, selection_size=256, eval_size=512)
    return Session(common.model_config(model, **over), progress=False)


def kd_on(session: Session, repaired: torch.nn.Module, masks, step: DistillStep, seed: int) -> tuple[Any, float]:
    model = copy.deepcopy(repaired)
    images = (session.splits.distill or session.splits.calib).x
    t0 = time.perf_counter()
    distill(model, session.dense, images, step, masks, session.device, seed)
    return model, time.perf_counter() - t0


class Results:
    """A CSV that grows row by row (a rerun skips the keys it holds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # budgets are text ("0.9", "2:4"); a cell rerun after an interruption keeps its last row
        self.df = pd.read_csv(path, dtype={"budget": str}) if path.exists() else pd.DataFrame()
        keys = [c for c in ("name", "model", "budget", "seed", "rule", "arm") if c in self.df.columns]
        if keys:
            self.df = self.df.drop_duplicates(subset=keys, keep="last").reset_index(drop=True)

    def has(self, **k: Any) -> bool:
        if self.df.empty:
            return False
        sel = np.ones(len(self.df), bool)
        for c, v in k.items():
            sel &= self.df[c].astype(str).to_numpy() == str(v)
        return bool(sel.any())

    def add(self, row: dict[str, Any]) -> None:
        self.df = pd.concat([self.df, pd.DataFrame([row])], ignore_index=True)
        tmp = self.path.with_suffix(".tmp")
        self.df.to_csv(tmp, index=False)
        tmp.replace(self.path)
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


SCREEN: list[tuple[str, dict[str, Any], int]] = [
    # (name, DistillStep settings, distill images)
    ("lr=3e-5", {"lr": 3e-5}, 1024),
    ("lr=1e-4", {"lr": 1e-4}, 1024),
    ("lr=3e-4", {"lr": 3e-4}, 1024),
    ("lr=1e-3", {"lr": 1e-3}, 1024),
    ("lr=3e-3", {"lr": 3e-3}, 1024),
    ("lr=1e-2", {"lr": 1e-2}, 1024),
    ("aug=none", {"aug": "none"}, 1024),
    ("aug=flip", {"aug": "flip"}, 1024),
    ("loss=block", {"loss": "block"}, 1024),
    ("loss=kl+block", {"loss": "kl+block"}, 1024),
    ("params=all", {"params": "all"}, 1024),
    ("steps=100", {"steps": 100}, 1024),
    ("steps=600", {"steps": 600}, 1024),
    ("images=4096", {}, 4096),
    ("images=8192", {}, 8192),
    ("images=8192,steps=600", {"steps": 600}, 8192),
    # the winners together (chosen above on the selection split)
    ("combined,images=8192", {"loss": "kl+block", "params": "all", "steps": 600}, 8192),
]


def part_screen(args, out: Path) -> None:
    res = Results(out / "screen.csv")
    model, budget, seed = args.models[0], 0.9, args.seeds[0]
    session = open_session(model, seed, quick=args.quick)
    counts = allocate(session, "global", budget).counts
    repaired, report = repaired_model(session, counts, BASE)
    if not res.has(name="none"):
        res.add(
            {
                "name": "none",
                "model": model,
                "budget": budget,
                "seed": seed,
                "seconds": 0.0,
                **scores(session, repaired),
            }
        )
    by_size = {0: session}
    for name, kw, images in SCREEN:
        if "lr" not in kw:  # every other setting at the learning rate with the lowest selection KL
            lr_rows = res.df[res.df.name.str.startswith("lr=")]
            kw = {**kw, "lr": float(lr_rows.sort_values("selection_kl").name.iloc[0][3:])}
        if res.has(name=name):
            continue
        size = 0 if images <= session.splits.calib.n else images
        if size not in by_size:
            by_size[size] = open_session(model, seed, distill_size=size, quick=args.quick)
        step = DistillStep(**kw)
        kd, secs = kd_on(by_size[size], repaired, report.masks, step, seed)
        row = {"name": name, "model": model, "budget": budget, "seed": seed, "step": str(step), "seconds": secs}
        res.add({**row, **scores(session, kd)})
    # the place in the pipeline: kd before the channel-wise step
    name = "place=obs>bn>kd>naive"
    if not res.has(name=name):
        t0 = time.perf_counter()
        m, _ = repaired_model(session, counts, "obs>bn>kd>naive@block+logits")
        row = {"name": name, "model": model, "budget": budget, "seed": seed, "seconds": time.perf_counter() - t0}
        res.add({**row, **scores(session, m)})
    write_md(res.df, out / "screen.md", "screen", f"{model} at {budget}, seed {seed}, global magnitude counts")


def part_compare(args, out: Path, step: DistillStep) -> None:
    res = Results(out / "compare.csv")
    for model in args.models:
        for seed in args.seeds:
            session = None
            for budget in args.budgets:
                if res.has(model=model, budget=budget, seed=seed, arm="kd"):
                    continue
                session = session or open_session(model, seed, args.distill_size, args.quick)
                t0 = time.perf_counter()
                if ":" in budget:
                    nm_session = Session(replace_pattern(session, budget), progress=False)
                    target, pruning = nm_session, nm_session.pruning()
                else:
                    target, pruning = session, session.pruning(allocate(session, "global", float(budget)).counts)
                repaired, report = repaired_model(target, pruning, BASE)
                base_s = time.perf_counter() - t0
                row = {"model": model, "budget": budget, "seed": seed}
                res.add({**row, "arm": "base", "seconds": base_s, **scores(target, repaired)})
                kd, secs = kd_on(target, repaired, report.masks, step, seed)
                res.add({**row, "arm": "kd", "seconds": secs, **scores(target, kd)})
    write_md(
        res.df, out / "compare.md", "compare", f"kd settings: {step.settings()}, distill images {args.distill_size}"
    )


def replace_pattern(session: Session, pattern: str):
    from dataclasses import replace

    return replace(session.cfg, pattern=pattern)


def part_alloc(args, out: Path, step: DistillStep) -> None:
    res = Results(out / "alloc.csv")
    for model in args.models:
        for seed in args.seeds:
            session = None
            for budget in args.budgets:
                for rule in RULES:
                    if res.has(model=model, budget=budget, seed=seed, rule=rule, arm="kd"):
                        continue
                    # rr-greedy plans on the profile of the pipeline's reconstruction
                    session = session or open_session(model, seed, args.distill_size, args.quick, profile_repair="obs")
                    counts = allocate(session, rule, float(budget)).counts
                    repaired, report = repaired_model(session, counts, BASE)
                    row = {"model": model, "budget": budget, "seed": seed, "rule": rule}
                    res.add({**row, "arm": "base", "seconds": 0.0, **scores(session, repaired)})
                    kd, secs = kd_on(session, repaired, report.masks, step, seed)
                    res.add({**row, "arm": "kd", "seconds": secs, **scores(session, kd)})
    write_md(res.df, out / "alloc.md", "alloc", f"kd settings: {step.settings()}, distill images {args.distill_size}")


def write_md(df: pd.DataFrame, path: Path, part: str, setting: str) -> None:
    lines = [f"# distill_repair: {part}", "", setting, "", f"machine: {common.machine()}", ""]
    n = int(df.get("test_top1", pd.Series([0])).count())
    if part == "screen":
        lines += [
            "Chosen on the selection split (KL, agreement); test top-1 reported only (10,000 test images).",
            "",
            "| setting | step | selection KL | selection agreement % | test top-1 % | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for _, r in df.iterrows():
            step = r.get("step") if isinstance(r.get("step"), str) else ""
            lines.append(
                f"| {r['name']} | {step} | {r.selection_kl:.4f} | {100 * r.selection_agreement:.2f} | "
                f"{100 * r.test_top1:.2f} | {r.seconds:.0f} |"
            )
    else:
        keys = ["model", "budget"] + (["rule"] if part == "alloc" else [])
        lines += [
            "Test top-1 %: mean over seeds ± 95% t half-width; kd − base paired over seeds. Selection KL mean.",
            "",
            "| "
            + " | ".join(keys)
            + " | seeds | base top-1 | kd top-1 | kd − base | base sel. KL | kd sel. KL | kd s |",
            "|" + "---|" * (len(keys) + 7),
        ]
        for k, g in df.groupby(keys, sort=False):
            b = g[g.arm == "base"].sort_values("seed")
            d = g[g.arm == "kd"].sort_values("seed")
            seeds = sorted(set(b.seed) & set(d.seed))
            b, d = b[b.seed.isin(seeds)], d[d.seed.isin(seeds)]
            if not seeds:
                continue
            mb, hb, _ = common.t_interval(100 * b.test_top1.to_numpy())
            md, hd, _ = common.t_interval(100 * d.test_top1.to_numpy())
            mdiff, hdiff, _ = common.t_interval(100 * (d.test_top1.to_numpy() - b.test_top1.to_numpy()))
            kk = k if isinstance(k, tuple) else (k,)
            lines.append(
                "| "
                + " | ".join(str(x) for x in kk)
                + f" | {len(seeds)} | {mb:.2f} ± {hb:.2f} | {md:.2f} ± {hd:.2f} | "
                f"{mdiff:+.2f} ± {hdiff:.2f} | {b.selection_kl.mean():.4f} | {d.selection_kl.mean():.4f} | "
                f"{d.seconds.mean():.0f} |"
            )
    lines += ["", f"rows: {len(df)} ({n} with test top-1)"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--part", choices=("screen", "compare", "alloc"), required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", nargs="+", default=["0.8", "0.9", "0.95", "2:4"])
    p.add_argument("--kd", default="kd", help="the kd step of the compare and alloc parts (text form)")
    p.add_argument("--distill-size", type=int, default=0, help="images kd fits on (0: the calibration split)")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    common.shared_dir(args.shared)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = common.ROOT / "studies" / "results" / f"distill_repair{args.tag}"
    out.mkdir(parents=True, exist_ok=True)
    step = RepairPipeline.parse(args.kd).steps[0]
    if not isinstance(step, DistillStep):
        raise SystemExit(f"error: --kd {args.kd!r} is not a kd step: pass kd[:OPTION=VALUE...]")
    if args.part == "screen":
        part_screen(args, out)
    elif args.part == "compare":
        part_compare(args, out, step)
    else:
        part_alloc(args, out, step)


if __name__ == "__main__":
    common.run_main(main)
