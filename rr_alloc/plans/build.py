"""A plan from a session's allocation and verification, and the main job (allocate, verify, build) in one call."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from .. import evidence
from ..api import Allocation, Verification, allocate, verify
from ..errors import UserError
from ..repair import RepairPipeline
from ..session import Session
from .plan import LayerPlan, Plan

__all__ = ["build_plan", "verify_block", "plan_budget"]


def verify_block(
    session: Session,
    check: Verification,
    reference: Allocation | None,
    reference_check: Verification | None,
    repair: str,
    split: str = "test",
) -> dict[str, Any]:
    """The plan's ``verify`` block: its metrics, the dense top-1, the reference plan's metrics and what the
    repair did."""
    m, dense = check[split], session.dense_metrics(split)
    block = {
        "split": split,
        "n": m.n,
        "repair": repair,
        "top1": m.top1,
        "agreement": m.agreement,
        "kl": m.kl,
        "dense_top1": dense.top1,
    }
    if reference is not None and reference_check is not None:
        ref = reference_check[split]
        block["reference"] = {
            "allocator": reference.rule,
            "top1": ref.top1,
            "agreement": ref.agreement,
            "kl": ref.kl,
            "achieved_sparsity": session.achieved(reference.counts),
        }
    block.update(check.report.plan_fields())
    return block


def build_plan(session: Session, alloc: Allocation, repair: str, verified: dict[str, Any] | None = None) -> Plan:
    """The plan document for ``alloc``, with everything needed to rebuild and verify it."""
    cfg, splits = session.cfg, session.splits
    pipe = RepairPipeline.parse(repair)
    prof = evidence.profile_meta(session)
    return Plan(
        layers=[
            LayerPlan(layer.name, int(alloc.counts[layer.name]), layer.n_weights, layer.shape)
            for layer in session.layers
        ],
        budget=alloc.budget,
        allocator=alloc.rule,
        repair=str(pipe),
        budget_unit=cfg.unit,
        mask_rule=pipe.mask_rule,
        pattern=cfg.pattern,
        achieved_sparsity=session.achieved(alloc.counts) if cfg.unit == "flops" else None,
        source=session.source(),
        calibration={
            "size": splits.calib.n,
            "selection_size": splits.selection.n,
            "validation_size": splits.validation.n if splits.validation else 0,
            **({"distill_size": splits.distill.n} if splits.distill is not None else {}),
            "seed": cfg.seed,
            **({"bn_check": session.calibration.to_dict()} if session.calibration is not None else {}),
        },
        search=alloc.search.to_dict() if alloc.search is not None else {},
        rule_choice=alloc.choice.to_dict() if alloc.choice is not None else {},
        profile={
            "grid": [float(g) for g in session.grid],
            "s_max": cfg.s_max,
            "lambda": cfg.lam,
            "layer_weights": cfg.layer_weights,
            **{k: v for k, v in prof.items() if k in ("profile_repair", "n_images")},
        },
        verify=verified or {},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def run_allocation(session: Session, budget: float | None) -> Allocation:
    """The session's allocation at ``budget``: ``cfg.allocator``'s, or with ``cfg.pattern`` the N:M pattern
    (its achieved sparsity is the budget when none is given)."""
    cfg, nm = session.cfg, session.nm
    if nm is None:
        if budget is None:
            raise ValueError("an unstructured run needs a budget (or cfg.pattern)")
        return allocate(session, cfg.allocator, budget)
    counts = session.pruning().pruned_counts(session.dense)
    if not any(counts.values()):
        raise UserError(
            f"--pattern {nm[0]}:{nm[1]} prunes nothing on this model: no prunable layer has a multiple of "
            f"{nm[1]} input channels: pass a pattern whose M divides them (e.g. 2:4)"
        )
    return Allocation(f"{nm[0]}:{nm[1]}", session.achieved(counts) if budget is None else budget, counts)


def plan_budget(session: Session, budget: float | None = None, check: bool = True) -> tuple[Plan, Allocation]:
    """The main job: allocate ``budget`` with the session's allocator (or prune by its N:M pattern) and,
    with ``check``, verify the plan and the reference rule beside it on the test split.

    Returns the plan and its allocation (a search's study rides on it). With ``cfg.pattern`` (``"2:4"``)
    the plan is the N:M pattern and ``budget`` its achieved sparsity; the reference verified beside it is
    global magnitude at that sparsity.
    """
    cfg = session.cfg
    alloc = run_allocation(session, budget)
    block: dict[str, Any] = {}
    if check:
        mine = verify(session, session.pruning(alloc.counts), cfg.repair)
        reference = allocate(session, "global" if session.nm else cfg.reference_allocator, alloc.budget)
        block = verify_block(session, mine, reference, verify(session, reference.counts, cfg.repair), cfg.repair)
    return build_plan(session, alloc, cfg.repair, block), alloc
