"""rr_alloc: decide how much to prune each layer, by Relative Repairability.

Library API (mirrors the CLI)::

    from rr_alloc import RunConfig, search, Plan, apply_plan
    plan, wb = search(RunConfig(), budget=0.9)     # embedded digits default
    plan.save("plan.json")
    model = apply_plan(wb.dense, Plan.load("plan.json"))   # pruned copy (no repair)

Importing the library imports no command-line code (``rr_alloc.cli`` is separate).
"""

from .config import RunConfig
from .errors import UserError
from .plan import LayerPlan, Plan
from .repair.persist import load_pruned, save_pruned
from .replay import apply_plan
from .run import search
from .version import __version__

__all__ = [
    "__version__",
    "RunConfig",
    "UserError",
    "Plan",
    "LayerPlan",
    "search",
    "apply_plan",
    "load_pruned",
    "save_pruned",
]
