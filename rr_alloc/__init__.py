"""rr_alloc: decide how much to prune each layer, by Relative Repairability.

Library API (mirrors the CLI)::

    from rr_alloc import RunConfig, search, Plan, apply_plan
    plan, wb = search(RunConfig(), budget=0.9)     # embedded digits default
    plan.save("plan.json")
    model = apply_plan(wb.dense, Plan.load("plan.json"))   # pruned copy (no repair)

Importing the library imports no command-line code (``rr_alloc.cli`` is separate).
"""

from importlib import import_module
from typing import Any

from .version import __version__

# the public names and the modules that define them, imported on first use: ``python -m rr_alloc`` starts
# without loading torch first (a Ctrl-C while it loads is then one line), and ``--help`` is quick
_EXPORTS = {
    "RunConfig": ".config",
    "UserError": ".errors",
    "Plan": ".plan",
    "LayerPlan": ".plan",
    "search": ".run",
    "apply_plan": ".replay",
    "load_pruned": ".repair.persist",
    "save_pruned": ".repair.persist",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rr_alloc' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
