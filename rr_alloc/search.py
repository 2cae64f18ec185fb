"""The main job: profile -> allocate -> verify -> write plan, profile CSV and figure."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from .config import RunConfig
from .evaluate import Metrics, wilson_interval
from .plan import Plan
from .report import layer_table, plot_rr_curves, write_profile_csv
from .workbench import Workbench

__all__ = ["search", "run_search", "run_verify", "metrics_row"]


def metrics_row(name: str, m: Metrics, sparsity: float | None) -> dict[str, Any]:
    lo, hi = wilson_interval(m.top1, m.n)
    return {"plan": name, "top1 %": round(100 * m.top1, 2), "95% CI": f"{100 * lo:.1f}-{100 * hi:.1f}",
            "agreement %": round(100 * m.agreement, 2), "KL": round(m.kl, 4),
            "sparsity": None if sparsity is None else round(sparsity, 4)}


def _verify_block(wb: Workbench, m: Metrics, ref: Metrics | None, ref_name: str, ref_sparsity: float | None,
                  repair: str, split: str = "test") -> dict[str, Any]:
    dense = wb.dense_metrics(split)
    block = {"split": split, "n": m.n, "repair": repair, "top1": m.top1, "agreement": m.agreement, "kl": m.kl,
             "dense_top1": dense.top1}
    if ref is not None:
        block["reference"] = {"allocator": ref_name, "top1": ref.top1, "agreement": ref.agreement, "kl": ref.kl,
                              "achieved_sparsity": ref_sparsity}
    return block


def search(cfg: RunConfig, budget: float, verify: bool = True, workbench: Workbench | None = None,
           progress: bool = False) -> tuple[Plan, Workbench]:
    """Library entry point: allocate ``budget`` with ``cfg.allocator`` and (optionally) verify.

    Returns the plan (with its verify block on the test split) and the workbench,
    whose profile and caches can be reused for further budgets or allocators.
    """
    wb = workbench or Workbench(cfg, progress=progress)
    counts = wb.allocate(cfg.allocator, budget)
    verify_block: dict[str, Any] = {}
    if verify:
        m = wb.verify(counts, cfg.repair)
        ref_name = cfg.reference_allocator
        ref_counts = wb.allocate(ref_name, budget)
        ref = wb.verify(ref_counts, cfg.repair)
        verify_block = _verify_block(wb, m, ref, ref_name, wb.problem(budget).achieved(ref_counts), cfg.repair)
    plan = wb.make_plan(counts, budget, cfg.allocator, cfg.repair, verify_block)
    return plan, wb


def run_search(cfg: RunConfig, budget: float, out: Path, verify: bool = True, embedded_note: str = "") -> Plan:
    """CLI flow: progress lines, the search, the files, and the summary tables."""
    t0 = time.perf_counter()
    print(f"rr_alloc search: budget {budget:g} ({cfg.unit}), allocator {cfg.allocator}, repair {cfg.repair}",
          flush=True)
    wb = Workbench(cfg, progress=True)
    n_w = sum(l.n_weights for l in wb.layers)
    print(f"model {cfg.model}: {len(wb.layers)} prunable layers, {n_w:,} weights; device {wb.device}")
    print(f"data {wb.splits.description}; calibration {wb.splits.calib.n} + selection {wb.splits.selection.n} "
          f"training images (seed {cfg.seed}, disjoint); test {wb.splits.test.n} images (reporting only)")
    dense = wb.dense_metrics("test")
    print(f"dense top-1 on test: {100 * dense.top1:.2f}%", flush=True)
    prof = wb.profile() if "profile" in _needs(cfg.allocator) else None
    if prof is not None:
        print(f"RR profile: {len(prof.layers)} layers x {len(prof.grid)} grid points in "
              f"{wb.timings['profile']:.1f}s (cache {prof.meta.get('cache')})", flush=True)
    plan, _ = search(cfg, budget, verify=verify, workbench=wb)
    out = Path(out)
    plan.save(out)
    extra = []
    if prof is None:
        prof = wb.profile()
    extra.append(write_profile_csv(prof, out.with_name("profile.csv")))
    extra.append(plot_rr_curves(prof, out.with_name("rr_curves.png"), plan.sparsities,
                                title=f"{cfg.model}: RR profile, {cfg.allocator} plan at {budget:g}"))
    ref_name = cfg.reference_allocator
    ref_counts = dict(zip([l.name for l in wb.layers], (int(k) for k in wb.allocate(ref_name, budget))))
    table = layer_table(plan, prof, {ref_name: ref_counts})
    print()
    print(table.to_string(index=False))
    print(f"\nachieved global sparsity: {plan.achieved_sparsity:.4f} ({cfg.unit}; target {budget:.4f})")
    if verify:
        v = plan.verify
        rows = [metrics_row(f"dense", dense, 0.0),
                metrics_row(f"{cfg.allocator} + repair", Metrics(v["top1"], v["agreement"], v["kl"], v["n"]),
                            plan.achieved_sparsity)]
        if "reference" in v:
            r = v["reference"]
            rows.append(metrics_row(f"{r['allocator']} + repair", Metrics(r["top1"], r["agreement"], r["kl"], v["n"]),
                                    r["achieved_sparsity"]))
        print(f"\nverification: prune -> {cfg.repair} on {wb.splits.calib.n} calibration images -> "
              f"test split ({v['n']} images)")
        print(pd.DataFrame(rows).to_string(index=False))
    print(f"\nwrote {out} (plan), {extra[0].name}, {extra[1].name} in {out.parent}  "
          f"[{time.perf_counter() - t0:.1f}s]")
    if cfg.allocator == "optuna":
        from .optuna_storage import summary_lines

        print("\n".join(summary_lines(cfg.storage, cfg.objective)))
    if cfg.model == "digits_resnet" and embedded_note:
        print("\n" + embedded_note)
    return plan


def _needs(allocator: str) -> tuple[str, ...]:
    from .allocators import ALLOCATORS

    cls = ALLOCATORS.get(allocator)
    return cls.needs if cls else ()


def config_from_plan(plan: Plan) -> dict[str, Any]:
    """``RunConfig`` keyword arguments that rebuild the plan's model and data."""
    src = plan.source
    if not src:
        from .errors import UserError

        raise UserError("the plan has no source block: pass --model/--dataset flags to rebuild its model")
    data = src.get("data", {})
    kw = {"model": src.get("model"), "checkpoint": src.get("checkpoint"), "num_classes": src.get("num_classes"),
          "pretrained": bool(src.get("pretrained", False)), "dataset": data.get("kind"),
          "train_data": data.get("train"), "test_data": data.get("test"), "transform": data.get("transform"),
          "calib_size": data.get("calib_size"), "selection_size": data.get("selection_size"),
          "eval_size": data.get("eval_size"), "seed": data.get("seed", 0), "download": data.get("download", False),
          "include": tuple(src.get("include", ())), "exclude": tuple(src.get("exclude", ())),
          "batch_size": src.get("batch_size", 256), "repair": plan.repair, "unit": plan.budget_unit}
    if plan.profile.get("grid"):
        kw["grid"] = tuple(plan.profile["grid"])
        kw["s_max"] = plan.profile.get("s_max", 0.99)
    return {k: v for k, v in kw.items() if v is not None}


def check_checkpoint_hash(plan: Plan) -> None:
    from .errors import UserError
    from .io_utils import sha256_file

    ck, want = plan.source.get("checkpoint"), plan.source.get("checkpoint_sha256")
    if ck and want:
        if not Path(ck).is_file():
            raise UserError(f"the plan's checkpoint {ck} does not exist: pass --checkpoint with its new location")
        if sha256_file(ck) != want:
            raise UserError(f"checkpoint {ck} changed since the plan was made (SHA-256 differs): "
                            "re-run search on the new checkpoint")


def model_from_plan(plan: Plan, cfg: RunConfig):
    """The plan's dense model (checkpoint hash checked), without loading any data."""
    from .models import build_model, load_checkpoint

    if cfg.checkpoint == plan.source.get("checkpoint"):
        check_checkpoint_hash(plan)
    model = build_model(cfg.model, cfg.num_classes, cfg.pretrained)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    return model.eval()


def workbench_for_plan(args) -> tuple[Plan, RunConfig, Workbench]:
    """Load ``args.plan``, rebuild its model and data (flags override its source), check they match."""
    from .cli import config_from_args
    from .errors import UserError

    plan = Plan.load(args.plan)
    cfg = config_from_args(args, base=config_from_plan(plan))
    if cfg.checkpoint == plan.source.get("checkpoint"):
        check_checkpoint_hash(plan)
    wb = Workbench(cfg, progress=True)
    plan.check_model(wb.dense)
    if {l.name for l in wb.layers} != {l.name for l in plan.layers}:
        raise UserError("the plan's layers differ from the model's prunable layers: use the plan's "
                        "--include/--exclude or regenerate the plan")
    return plan, cfg, wb


def run_verify(args) -> Metrics:
    """``verify`` command: rebuild from the plan's source, prune, repair, evaluate."""
    plan, cfg, wb = workbench_for_plan(args)
    m = wb.verify(plan.counts, cfg.repair, split=args.split)
    dense = wb.dense_metrics(args.split)
    print(f"plan {args.plan}: {plan.allocator} at budget {plan.budget:g}, achieved {plan.achieved_sparsity:.4f}")
    print(f"verification: prune -> {cfg.repair} -> {args.split} split ({m.n} images)")
    rows = [metrics_row("dense", dense, 0.0), metrics_row(f"{plan.allocator} + repair", m, plan.weight_sparsity)]
    print(pd.DataFrame(rows).to_string(index=False))
    return m
