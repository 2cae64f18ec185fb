"""The main job as a library call: allocate a budget (or an N:M pattern), verify, build the plan."""

from __future__ import annotations

from typing import Any

from .config import RunConfig
from .errors import UserError
from .evaluate import Metrics
from .plan import Plan
from .workbench import Workbench

__all__ = ["search", "verify_block"]


def verify_block(
    wb: Workbench,
    m: Metrics,
    ref: Metrics | None,
    ref_name: str,
    ref_sparsity: float | None,
    repair: str,
    split: str = "test",
) -> dict[str, Any]:
    """The plan's ``verify`` block: its metrics, the dense top-1 and the reference plan's metrics."""
    dense = wb.dense_metrics(split)
    block = {
        "split": split,
        "n": m.n,
        "repair": repair,
        "top1": m.top1,
        "agreement": m.agreement,
        "kl": m.kl,
        "dense_top1": dense.top1,
    }
    if ref is not None:
        block["reference"] = {
            "allocator": ref_name,
            "top1": ref.top1,
            "agreement": ref.agreement,
            "kl": ref.kl,
            "achieved_sparsity": ref_sparsity,
        }
    return block


def search(
    cfg: RunConfig,
    budget: float | None = None,
    verify: bool = True,
    workbench: Workbench | None = None,
    progress: bool = False,
) -> tuple[Plan, Workbench]:
    """Allocate ``budget`` with ``cfg.allocator`` (or prune by ``cfg.pattern``) and, optionally, verify.

    Returns the plan (with its verify block on the test split) and the workbench, whose
    profile and caches can be reused for further budgets or allocators. With ``cfg.pattern``
    (``"2:4"``) the plan is the N:M pattern and ``budget`` is its achieved sparsity; the
    reference verified beside it is global magnitude at that sparsity.
    """
    wb = workbench or Workbench(cfg, progress=progress)
    nm = wb.nm
    if nm is not None:
        counts = wb.pruning().pruned_counts(wb.dense)
        if not any(counts.values()):
            raise UserError(
                f"--pattern {nm[0]}:{nm[1]} prunes nothing on this model: no prunable layer has a multiple of "
                f"{nm[1]} input channels: pass a pattern whose M divides them (e.g. 2:4)"
            )
        budget = wb.achieved(counts) if budget is None else budget
        allocator = f"{nm[0]}:{nm[1]}"
    else:
        if budget is None:
            raise ValueError("search needs a budget (or cfg.pattern)")
        counts = wb.allocate(cfg.allocator, budget)
        allocator = cfg.allocator
    verify_info: dict[str, Any] = {}
    if verify:
        m = wb.verify(wb.pruning(counts), cfg.repair)
        report = wb.evaluator.last_report
        ref_name = "global" if nm else cfg.reference_allocator
        ref_counts = wb.allocate(ref_name, budget)
        ref = wb.verify(ref_counts, cfg.repair)
        verify_info = verify_block(wb, m, ref, ref_name, wb.achieved(ref_counts), cfg.repair)
        if report is not None:
            verify_info.update(report.plan_fields())
    plan = wb.make_plan(counts, budget, allocator, cfg.repair, verify_info)
    return plan, wb
