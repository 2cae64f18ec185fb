"""CLI commands beyond search/verify/list: ``compare``, ``apply`` and ``export``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .errors import UserError

__all__ = ["register", "HANDLERS", "save_pruned", "load_pruned"]

HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {}


def register(sub, add_run_flags) -> None:
    from .export import FORMAT_HELP

    c = sub.add_parser("compare", help="allocate several budgets with several allocators, verify all, one table",
                       description="Profile once, allocate each budget with each allocator, verify every plan "
                                   "with the same repair pipeline(s), print one table and write CSV + figure.")
    c.add_argument("--budgets", type=float, nargs="+", required=True, help="global sparsities in (0, 1)")
    c.add_argument("--allocators", nargs="+", help="allocators (default: all but optuna)")
    c.add_argument("--repairs", nargs="+", help="repair pipelines to verify with (default: the run's --repair)")
    c.add_argument("--split", choices=["test", "selection"], default="test",
                   help="split to report on (test: reporting only; selection: for making choices)")
    c.add_argument("--out-dir", help="folder for compare.csv and compare.png (default runs/compare_<model>)")
    add_run_flags(c)
    HANDLERS["compare"] = cmd_compare

    a = sub.add_parser("apply", help="rebuild a plan's model, prune, repair, and save the pruned weights",
                       description="Rebuild the dense model and data from the plan's source block (the "
                                   "checkpoint's SHA-256 must match), prune by the plan, repair, check the "
                                   "per-layer sparsity, evaluate, and save a plain state_dict.")
    a.add_argument("--plan", required=True, help="plan JSON written by search")
    a.add_argument("--out", required=True, help="output file (.pt)")
    a.add_argument("--format", choices=["state_dict", "torchscript"], default="state_dict",
                   help="state_dict (default) or a TorchScript module")
    add_run_flags(a)
    HANDLERS["apply"] = cmd_apply

    e = sub.add_parser("export", help="write a plan in a downstream tool's format",
                       description="Formats: torch-prune (Python module applying torch.nn.utils.prune), "
                                   "torch-pruning (channel ratios; see the unit conversion in the file), "
                                   "llm-compressor and sparseml (recipe YAML), nni / nni-v2 (config_list JSON), "
                                   "masks (per-layer boolean masks, .pt), csv, markdown.")
    e.add_argument("--plan", required=True, help="plan JSON written by search")
    e.add_argument("--format", required=True, help=FORMAT_HELP)
    e.add_argument("--out", required=True, help="output file")
    add_run_flags(e)
    HANDLERS["export"] = cmd_export


# ------------------------------------------------------------------ compare
def cmd_compare(args: argparse.Namespace) -> int:
    from .allocators import ALLOCATORS
    from .cli import config_from_args
    from .report import save_figure, write_frame_csv
    from .workbench import Workbench

    for b in args.budgets:
        if not 0 < b < 1:
            raise UserError(f"--budgets must lie in (0, 1), got {b}: pass fractions such as 0.9")
    cfg = config_from_args(args)
    allocators = args.allocators or [a for a in ALLOCATORS if a != "optuna"]
    for a in allocators:
        if a not in ALLOCATORS:
            raise UserError(f"unknown allocator {a!r}: use one of {', '.join(ALLOCATORS)}")
    repairs = args.repairs or [cfg.repair]
    from .repair import RepairPipeline

    for r in repairs:
        RepairPipeline.parse(r)
    out_dir = Path(args.out_dir or Path("runs") / f"compare_{cfg.model.replace(':', '_')}")
    wb = Workbench(cfg, progress=True)
    print(f"compare: {cfg.model}, budgets {args.budgets}, allocators {allocators}, repairs {repairs}, "
          f"split {args.split} ({wb.split(args.split).n} images)", flush=True)
    rows, per_layer = [], []
    for b in args.budgets:
        for a in allocators:
            t0 = time.perf_counter()
            counts = wb.allocate(a, b)
            achieved = wb.problem(b).achieved(counts)
            for l, k in zip(wb.layers, counts):
                per_layer.append({"budget": b, "allocator": a, "layer": l.name, "sparsity": k / l.n_weights})
            for r in repairs:
                m = wb.verify(counts, r, split=args.split)
                rows.append({"budget": b, "allocator": a, "repair": r, "top1": m.top1, "agreement": m.agreement,
                             "kl": m.kl, "achieved_sparsity": achieved, "unit": cfg.unit, "split": args.split,
                             "n": m.n, "seconds": round(time.perf_counter() - t0, 2)})
                print(f"  budget {b:g} {a:<10} {r:<24} top1 {100 * m.top1:5.1f}  agreement "
                      f"{100 * m.agreement:5.1f}  kl {m.kl:.3f}", flush=True)
    df = pd.DataFrame(rows)
    write_frame_csv(df, out_dir / "compare.csv")
    write_frame_csv(pd.DataFrame(per_layer), out_dir / "compare_layers.csv")
    fig = compare_figure(df, pd.DataFrame(per_layer), cfg.model, [l.name for l in wb.layers])
    save_figure(fig, out_dir / "compare.png")
    show = df.assign(top1=(100 * df.top1).round(2), agreement=(100 * df.agreement).round(2), kl=df.kl.round(4),
                     achieved_sparsity=df.achieved_sparsity.round(4))
    print()
    print(show[["budget", "allocator", "repair", "top1", "agreement", "kl", "achieved_sparsity"]].to_string(index=False))
    print(f"\nwrote {out_dir / 'compare.csv'}, compare_layers.csv, compare.png")
    return 0


def compare_figure(df: pd.DataFrame, layers: pd.DataFrame, model: str, order: list[str]):
    """Left: top-1 vs budget per allocator (one line style per repair). Right: per-layer sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8))
    styles = ["-o", "--s", ":^", "-.d"]
    for j, (rep, g) in enumerate(df.groupby("repair", sort=False)):
        for a, ga in g.groupby("allocator", sort=False):
            ax1.plot(ga.budget, 100 * ga.top1, styles[j % 4], label=f"{a} | {rep}", ms=4)
    ax1.set(xlabel="global sparsity budget", ylabel=f"top-1 (%) on {df.split.iloc[0]}", title=model)
    ax1.legend(fontsize=7)
    b = sorted(layers.budget.unique())[len(layers.budget.unique()) // 2]
    sub = layers[layers.budget == b]
    x = range(len(order))
    for a, ga in sub.groupby("allocator", sort=False):
        ax2.plot(x, ga.set_index("layer").loc[order, "sparsity"].values, "-o", ms=3, label=a)
    ax2.set_xticks(list(x), order, rotation=90, fontsize=6)
    ax2.set(ylabel="layer sparsity", title=f"per-layer sparsity at budget {b:g}")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------- apply
def _spec_path(out: Path) -> Path:
    return out.with_name(out.name + ".repair.json")


def save_pruned(model, out: str | Path, plan_path: str | None = None) -> Path | None:
    """Save a plain state_dict; when output affines exist, also a repair spec beside it.

    Returns the spec path (or ``None`` when every correction folded, so the file
    loads into the unmodified architecture).
    """
    import torch

    from .io_utils import atomic_path, write_text_atomic
    from .repair import affine_modules

    out = Path(out)
    with atomic_path(out) as tmp:
        torch.save(model.state_dict(), tmp)
    aff = affine_modules(model)
    spec = _spec_path(out)
    if not aff:
        spec.unlink(missing_ok=True)
        return None
    body = {"format": "rr_alloc.repair_spec", "version": 1, "plan": plan_path,
            "affine": [{"module": n, "channels": a.scale.numel(), "channel_dim": a.channel_dim}
                       for n, a in aff.items()]}
    write_text_atomic(spec, json.dumps(body, indent=2) + "\n")
    return spec


def load_pruned(model, path: str | Path, map_location: Any = "cpu"):
    """Load ``apply``'s output into a fresh ``model``, re-attaching output affines from the spec if any."""
    import torch

    from .repair import attach_output_affine

    path = Path(path)
    spec = _spec_path(path)
    if spec.exists():
        for a in json.loads(spec.read_text())["affine"]:
            attach_output_affine(model.get_submodule(a["module"]), int(a["channels"]), int(a["channel_dim"]))
    sd = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def cmd_apply(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import compare_logits, logits_of
    from .search import workbench_for_plan

    plan, cfg, wb = workbench_for_plan(args)
    model, report = wb.repaired_model(plan.counts, cfg.repair)
    rows, ok = [], True
    for l in plan.layers:
        zeros = int((model.get_submodule(l.name).weight == 0).sum())
        rows.append({"layer": l.name, "weights": l.n_weights, "planned": l.n_pruned, "zeros": zeros,
                     "sparsity": round(zeros / l.n_weights, 4)})
        ok &= zeros >= l.n_pruned
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    total = table.zeros.sum() / table.weights.sum()
    print(f"achieved global sparsity {total:.4f} (plan {plan.weight_sparsity:.4f})")
    if not ok:
        raise RuntimeError("a layer has fewer zeros than planned: this is a bug, please report it")
    dense_logits, labels = wb.dense_logits("test")
    m = compare_logits(logits_of(model, wb.splits.test, wb.device)[0], labels, dense_logits)
    print(f"repair {cfg.repair}: test top-1 {100 * m.top1:.2f}% on {m.n} images "
          f"(agreement {100 * m.agreement:.2f}%, KL {m.kl:.4f})")
    out = Path(args.out)
    if args.format == "torchscript":
        from .io_utils import atomic_path

        example = wb.splits.calib.x[:2].to(wb.device)
        try:
            scripted = torch.jit.script(model)
            how = "scripted"
        except Exception:
            scripted = torch.jit.trace(model, example)
            how = "traced (the model does not script)"
        with atomic_path(out) as tmp:
            torch.jit.save(scripted, str(tmp))
        print(f"wrote {out} (TorchScript, {how}; load with torch.jit.load)")
        return 0
    spec = save_pruned(model, out, args.plan)
    if spec is None:
        print(f"wrote {out}: plain state_dict, every correction folded into existing parameters; "
              f"load it into the unmodified {cfg.model} with load_state_dict")
    else:
        print(f"wrote {out} and {spec.name}: corrections at {len(report.affine_sites)} sites "
              f"({', '.join(report.affine_sites[:3])}{'...' if len(report.affine_sites) > 3 else ''}) cannot fold "
              "into existing parameters and live in small per-channel affine modules; load with "
              "rr_alloc.load_pruned(model, path), which re-attaches them from the spec")
    return 0


# ------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from .cli import config_from_args
    from .export import export_plan
    from .plan import Plan
    from .search import config_from_plan

    plan = Plan.load(args.plan)

    def model():
        from .search import model_from_plan

        return model_from_plan(plan, config_from_args(args, base=config_from_plan(plan)))

    def obs_masks():
        from .search import workbench_for_plan

        _, cfg, wb = workbench_for_plan(args)
        _, report = wb.repaired_model(plan.counts, cfg.repair)
        return report.masks

    needs_model = args.format in ("masks", "torch-pruning")
    path = export_plan(plan, args.format, args.out, model_fn=model if needs_model else None,
                       masks_fn=obs_masks if args.format == "masks" and plan.mask_rule == "obs" else None)
    print(f"wrote {path} ({args.format})")
    from .export import reconstruction_note

    note = reconstruction_note(plan)
    if note:
        print(f"note: {note}")
    return 0
