"""Repair sites, discovered from module types, one recorded forward pass and the traced graph.

Site kinds:
- ``conv``: a Conv2d's output (before the BatchNorm that usually follows);
- ``bn``: a BatchNorm's output (folded into its affine);
- ``block``: the output of a residual block, i.e. any module (not a plain
  container, not a leaf) whose own ``forward`` adds two same-shaped tensors.
  Found by running one real forward on an example batch under a
  ``TorchFunctionMode`` that records every tensor addition and which module's
  forward was innermost at that moment, so blocks whose ``forward`` branches
  on data or arguments count too, and no architecture name table is needed.
  Without an example batch (or when that forward fails) each module is traced
  with ``torch.fx`` (``tracing.trace``) instead, children kept as leaves
  (untraceable ones are missed);
- ``logits``: the classifier output, the module that produces the model's output.

Missing kinds: a pipeline step asks for several kinds (``naive@block+logits``);
a model that lacks some of them (a VGG has no residual blocks, a ConvNeXt no
BatchNorm) runs the step on the sites it has. ``discover_sites`` appends the
missing kinds to its ``missing`` list and ``missing_note`` words the one line
the CLI prints. Only a step with no site at all among its kinds is refused
(``UserError``): nothing could be corrected, so the pipeline is wrong for this model.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UserError
from ..nn.hooks import forward_hooks
from .tracing import trace

__all__ = ["Site", "SITE_KINDS", "discover_sites", "forward_order", "missing_note", "conv_consumers", "logits_module"]

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


def _has_tensor_add(graph: fx.Graph) -> bool:
    for node in graph.nodes:
        is_add = (node.op == "call_function" and node.target in _ADDS) or (
            node.op == "call_method" and node.target in ("add", "add_")
        )
        if is_add and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2:
            return True
    return False


def _residual_blocks_fx(model: nn.Module) -> list[str]:
    names = []
    for name, m in model.named_modules():
        if not name or isinstance(m, _CONTAINERS) or not any(True for _ in m.children()):
            continue
        g = trace(m, children_as_leaves=True).graph  # an untraceable module contributes no graph facts
        if g is not None and _has_tensor_add(g):
            names.append(name)
    return names


# every way a forward can add two tensors: operators, in-place operators, functions and methods
_ADD_FUNCS = {
    torch.add,
    torch.Tensor.add,
    torch.Tensor.add_,
    torch.Tensor.__add__,
    torch.Tensor.__radd__,
    torch.Tensor.__iadd__,
}


class _AddRecorder(TorchFunctionMode):
    """Calls ``on_add()`` for every addition of two tensors of the same shape."""

    def __init__(self, on_add) -> None:
        super().__init__()
        self.on_add = on_add

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADD_FUNCS and len(args) >= 1:
            other = args[1] if len(args) > 1 else kwargs.get("other")
            a = args[0]
            if (
                isinstance(a, torch.Tensor)
                and isinstance(other, torch.Tensor)
                and a.dim() >= 2
                and a.shape == other.shape
            ):
                self.on_add()
        return func(*args, **kwargs)


@torch.no_grad()
def _residual_blocks_recorded(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Modules whose own forward adds two same-shaped tensors during one eval forward on ``example``."""
    names = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name)
    active: list[str] = []  # forwards in progress, innermost last
    found: set[str] = set()

    def pre(mod: nn.Module, args: Any) -> None:
        active.append(names[id(mod)])

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        active.pop()

    def on_add() -> None:
        if active:
            found.add(active[-1])

    handles = []
    was = model.training
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, always_call=True))
        model.eval()
        with _AddRecorder(on_add):
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    # plain containers and leaves are no blocks (a leaf's own add is an implementation detail)
    return [
        n
        for n, m in model.named_modules()
        if n in found and n and not isinstance(m, _CONTAINERS) and any(True for _ in m.children())
    ]


def _residual_blocks(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Residual blocks, recorded on ``example`` when given (fx tracing when not, or when that forward fails)."""
    if example is not None:
        try:
            return _residual_blocks_recorded(model, example)
        except Exception:  # a forward the recorder cannot follow: the fx fallback still finds traceable blocks
            pass
    return _residual_blocks_fx(model)


def conv_consumers(graph: fx.Graph | None, model: nn.Module) -> dict[str, str]:
    """conv name -> BatchNorm name, where that BatchNorm is the conv output's only user."""
    if graph is None:
        return {}
    out = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.Conv2d):
            users = list(node.users)
            if (
                len(users) == 1
                and users[0].op == "call_module"
                and isinstance(model.get_submodule(users[0].target), _BN)
            ):
                out[node.target] = users[0].target
    return out


def logits_module(graph: fx.Graph | None, model: nn.Module) -> str | None:
    """The module whose output is the model's output (traced), else the last ``nn.Linear``."""
    if graph is not None:
        for node in graph.nodes:
            if node.op == "output":
                arg = node.args[0]
                if isinstance(arg, fx.Node) and arg.op == "call_module":
                    return arg.target
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


_KIND_WHAT = {
    "block": "residual blocks (no module adds two tensors in its forward)",
    "conv": "Conv2d layers",
    "bn": "BatchNorm layers",
    "logits": "classifier output module",
}


def discover_sites(
    model: nn.Module,
    kinds: tuple[str, ...] | list[str],
    example: torch.Tensor | None = None,
    missing: list[str] | None = None,
) -> list[Site]:
    """Sites of the requested kinds, in ``named_modules`` order (see ``forward_order``).

    ``example``: an input batch; with it residual blocks are found by recording
    one forward (see the module docstring). Kinds the model lacks are skipped and
    appended to ``missing``; a ``UserError`` only when no requested kind exists.
    """
    unknown = [k for k in kinds if k not in SITE_KINDS]
    if unknown:
        raise UserError(f"unknown repair site {unknown[0]!r}: use one of {', '.join(SITE_KINDS)}")
    graph = trace(model).graph if {"conv", "logits"} & set(kinds) else None
    consumers = conv_consumers(graph, model) if "conv" in kinds else {}
    blocks = set(_residual_blocks(model, example)) if "block" in kinds else set()
    logits = logits_module(graph, model) if "logits" in kinds else None
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
    absent = [k for k in kinds if not any(s.kind == k for s in sites)]
    if absent and len(absent) == len(set(kinds)):
        k = absent[0]
        hint = (
            f"drop '{k}' from --repair"
            if len(absent) == 1
            else f"use sites this model has, e.g. {'+'.join(x for x in SITE_KINDS if x not in absent) or 'bn'}"
        )
        raise UserError(
            f"repair site '{k}' does not exist in this model: it has no {_KIND_WHAT[k]}"
            + (f" (nor {', '.join(repr(x) for x in absent[1:])} sites)" if len(absent) > 1 else "")
            + f"; {hint}"
        )
    if missing is not None:
        missing.extend(k for k in absent if k not in missing)
    return sites


def missing_note(kinds: tuple[str, ...] | list[str], missing: list[str]) -> str:
    """The one line saying that a step on ``kinds`` runs without the kinds this model lacks."""
    have = [k for k in kinds if k not in missing]
    what = "; ".join(f"no {_KIND_WHAT[k]}" for k in missing)
    return f"repair sites {'+'.join(kinds)}: this model has {what}; the step runs on its {'+'.join(have)} sites only"


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
        raise UserError(
            f"repair site {sorted(missing)[0]} is never called in forward: exclude it from the repair sites"
        )
    # a conv and its BN never tie; ties cannot occur since order is by first completion
    return sorted(sites, key=lambda s: (order[s.name], SITE_KINDS.index(s.kind)))
