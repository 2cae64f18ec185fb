"""Repair sites, discovered from module types and the traced graph.

Site kinds:
- ``conv``: a Conv2d's output (before the BatchNorm that usually follows);
- ``bn``: a BatchNorm's output (folded into its affine);
- ``block``: the output of a residual block, i.e. any module whose own
  ``forward`` adds two tensors (found by tracing each container with its
  children kept as leaves, so no architecture name table is needed);
- ``logits``: the classifier output, the module that produces the model's output.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import UserError
from ..hooks import forward_hooks

__all__ = ["Site", "SITE_KINDS", "discover_sites", "forward_order"]

SITE_KINDS = ("conv", "bn", "block", "logits")
_ADDS = {operator.add, operator.iadd, torch.add}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Site:
    """A place where a per-channel correction can act: module name, kind, channel axis."""

    name: str
    kind: str
    channel_dim: int = 1
    consumer_bn: str | None = None  # conv sites: the BatchNorm that alone consumes the output


class _ChildrenAsLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


class _StandardLeaves(fx.Tracer):
    pass


def _trace(module: nn.Module, tracer: fx.Tracer) -> fx.Graph | None:
    try:
        return tracer.trace(module)
    except Exception:  # untraceable control flow: that module contributes no graph facts
        return None


def _has_tensor_add(graph: fx.Graph) -> bool:
    for node in graph.nodes:
        is_add = (node.op == "call_function" and node.target in _ADDS) or \
                 (node.op == "call_method" and node.target in ("add", "add_"))
        if is_add and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2:
            return True
    return False


def _residual_blocks(model: nn.Module) -> list[str]:
    names = []
    for name, m in model.named_modules():
        if not name or isinstance(m, _CONTAINERS) or not any(True for _ in m.children()):
            continue
        g = _trace(m, _ChildrenAsLeaves())
        if g is not None and _has_tensor_add(g):
            names.append(name)
    return names


def _conv_consumers(graph: fx.Graph | None, model: nn.Module) -> dict[str, str]:
    """conv name -> BatchNorm name, where that BatchNorm is the conv output's only user."""
    if graph is None:
        return {}
    out = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.Conv2d):
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module" and \
                    isinstance(model.get_submodule(users[0].target), _BN):
                out[node.target] = users[0].target
    return out


def _logits_module(graph: fx.Graph | None, model: nn.Module) -> str | None:
    if graph is not None:
        for node in graph.nodes:
            if node.op == "output":
                arg = node.args[0]
                if isinstance(arg, fx.Node) and arg.op == "call_module":
                    return arg.target
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def discover_sites(model: nn.Module, kinds: tuple[str, ...] | list[str]) -> list[Site]:
    """Sites of the requested kinds, in ``named_modules`` order (see ``forward_order``)."""
    unknown = [k for k in kinds if k not in SITE_KINDS]
    if unknown:
        raise UserError(f"unknown repair site {unknown[0]!r}: use one of {', '.join(SITE_KINDS)}")
    graph = _trace(model, _StandardLeaves()) if {"conv", "logits"} & set(kinds) else None
    consumers = _conv_consumers(graph, model) if "conv" in kinds else {}
    blocks = set(_residual_blocks(model)) if "block" in kinds else set()
    logits = _logits_module(graph, model) if "logits" in kinds else None
    sites: list[Site] = []
    for name, m in model.named_modules():
        if "conv" in kinds and isinstance(m, nn.Conv2d):
            sites.append(Site(name, "conv", 1, consumers.get(name)))
        if "bn" in kinds and isinstance(m, _BN):
            sites.append(Site(name, "bn", 1))
        if name in blocks:
            sites.append(Site(name, "block", 1))
        if logits is not None and name == logits:
            sites.append(Site(name, "logits", -1 if isinstance(m, nn.Linear) else 1))
    for k in kinds:
        if not any(s.kind == k for s in sites):
            what = {"block": "residual blocks (no module adds two tensors in its forward)",
                    "conv": "Conv2d layers", "bn": "BatchNorm layers",
                    "logits": "classifier output module"}[k]
            raise UserError(f"repair site '{k}' does not exist in this model: it has no {what}; "
                            f"drop '{k}' from --repair")
    return sites


@torch.no_grad()
def forward_order(model: nn.Module, sites: list[Site], example: torch.Tensor) -> list[Site]:
    """Sort sites by when their module's forward finishes on ``example``."""
    order: dict[str, int] = {}

    def make(name: str):
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            order.setdefault(name, len(order))
        return hook

    names = {s.name for s in sites}
    with forward_hooks(model, {n: make(n) for n in names}):
        model(example)
    missing = names - set(order)
    if missing:
        raise UserError(f"repair site {sorted(missing)[0]} is never called in forward: "
                        "exclude it from the repair sites")
    # a conv and its BN never tie; ties cannot occur since order is by first completion
    return sorted(sites, key=lambda s: (order[s.name], SITE_KINDS.index(s.kind)))
