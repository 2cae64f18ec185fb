"""rr_alloc: decide how much to prune each layer, by Relative Repairability.

Library API (mirrors the CLI)::

    from rr_alloc import RunConfig, search, Plan, apply_plan
    plan, wb = search(RunConfig(), budget=0.9)     # embedded digits default
    plan.save("plan.json")
    model = apply_plan(wb.dense, Plan.load("plan.json"))   # pruned copy (no repair)
"""

__version__ = "0.1.0"

from .config import RunConfig
from .errors import UserError
from .plan import LayerPlan, Plan
from .search import search


def apply_plan(model, plan: "Plan", inplace: bool = False):
    """Magnitude-prune ``model`` by ``plan`` (layer-local counts); returns the pruned model."""
    import copy

    from .pruning import apply_masks, masks_for_plan

    plan.check_model(model)
    target = model if inplace else copy.deepcopy(model)
    apply_masks(target, masks_for_plan(target, plan.counts))
    return target


def load_pruned(model, path):
    """Load the output of ``rr_alloc apply`` into a fresh ``model`` (re-attaching any repair affines)."""
    from .commands import load_pruned as _load

    return _load(model, path)


__all__ = ["__version__", "RunConfig", "UserError", "Plan", "LayerPlan", "search", "apply_plan", "load_pruned"]
