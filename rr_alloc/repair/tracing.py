"""Tracing a model with ``torch.fx``: the one place it is done. A model ``torch.fx`` cannot follow (data-dependent
control flow and the like) gives ``None`` and the reason, and every caller falls back to plain forwards."""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import torch.fx as fx
from torch import nn

__all__ = ["Traced", "trace"]


class Traced(NamedTuple):
    """A module traced by ``torch.fx`` (``gm``), or ``None`` with the reason in ``why``."""

    gm: fx.GraphModule | None
    why: str = ""

    @property
    def graph(self) -> fx.Graph | None:
        return self.gm.graph if self.gm is not None else None


class _Tracer(fx.Tracer):
    def __init__(self, leaves: Collection[str], children_as_leaves: bool) -> None:
        super().__init__()
        self.leaves, self.children_as_leaves = leaves, children_as_leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.children_as_leaves or qualname in self.leaves or super().is_leaf_module(m, qualname)


def trace(module: nn.Module, leaves: Collection[str] = (), children_as_leaves: bool = False) -> Traced:
    """Trace ``module`` with the named submodules (or all children) kept as leaves; ``gm=None`` on failure."""
    try:
        graph = _Tracer(set(leaves), children_as_leaves).trace(module)
        return Traced(fx.GraphModule(module, graph))
    except Exception as e:  # data-dependent control flow and the like: callers fall back, never crash
        first = (str(e).strip().splitlines() or [""])[0]
        return Traced(None, f"{type(e).__name__}: {first}" if first else type(e).__name__)
