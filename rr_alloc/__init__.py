"""rr_alloc: decide how much to prune each layer, by Relative Repairability.

Library API (mirrors the CLI): a ``RunConfig`` loads into a ``Session``; ``allocate`` and ``verify`` return
values; a plan is built from them::

    from rr_alloc import RunConfig, Session, allocate, verify, build_plan, apply_plan, Plan
    session = Session(RunConfig())                          # the embedded digits default
    alloc = allocate(session, "rr-greedy", 0.9)             # per-layer pruned counts
    check = verify(session, alloc.counts, session.cfg.repair)
    print(check["test"].agreement, check.report.plan_fields())
    build_plan(session, alloc, session.cfg.repair).save("plan.json")
    model = apply_plan(session.dense, Plan.load("plan.json"))   # pruned copy (no repair)

``plan_budget(session, 0.9)`` is the ``search`` command's job in one call (allocate, verify the plan and
its reference rule, build the plan). Importing the library imports no command-line code (``rr_alloc.cli``).
"""

from importlib import import_module
from typing import Any

from .version import __version__

# the public names and the modules that define them, imported on first use: ``python -m rr_alloc`` starts
# without loading torch first (a Ctrl-C while it loads is then one line), and ``--help`` is quick
_EXPORTS = {
    "RunConfig": ".config.run_config",
    "UserError": ".errors",
    "Session": ".session",
    "allocate": ".api",
    "verify": ".api",
    "Allocation": ".api",
    "Verification": ".api",
    "Plan": ".plans.plan",
    "LayerPlan": ".plans.plan",
    "build_plan": ".plans.build",
    "plan_budget": ".plans.build",
    "apply_plan": ".plans.replay",
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
