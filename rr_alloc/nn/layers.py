"""Prunable layers: every Conv2d (subclasses too) and Linear, by dotted name."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .hooks import forward_hooks

__all__ = [
    "conv2d_as",
    "LayerInfo",
    "prunable_layers",
    "select_layers",
    "weight_aliases",
    "reconstructed_layers",
    "layer_macs",
]


@dataclass(frozen=True)
class LayerInfo:
    """A prunable layer: dotted name, weight shape and number of weights."""

    name: str
    shape: tuple[int, ...]
    n_weights: int
    kind: str  # "conv" or "linear"
    groups: int = 1


def select_layers(
    names: Sequence[str], include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[str]:
    """Filter dotted names by shell-style ``include``/``exclude`` patterns (``layer1.*``)."""
    out = list(names)
    if include:
        out = [n for n in out if any(fnmatch.fnmatchcase(n, p) for p in include)]
    if exclude:
        out = [n for n in out if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    return out


def conv2d_as(layer: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``layer``'s convolution (stride, padding and its mode, dilation, groups) with another ``weight``/``bias``."""
    if layer.padding_mode == "zeros":
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    if layer.padding == "same":  # as torch pads it: the extra pixel of an odd total goes after
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        pads = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
    else:
        pads = [0, 0, 0, 0] if layer.padding == "valid" else [p for p in reversed(layer.padding) for _ in (0, 1)]
    x = F.pad(x, pads, mode=layer.padding_mode)
    return F.conv2d(x, weight, bias, layer.stride, 0, layer.dilation, layer.groups)


def weight_aliases(model: nn.Module) -> dict[str, str]:
    """Conv2d/Linear layers whose weight tensor an earlier layer already holds (tied weights): alias -> first."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            key = id(m.weight)
            if key in first and first[key] != name:
                out.setdefault(name, first[key])
            first.setdefault(key, name)
    return out


def reconstructed_layers(model: nn.Module) -> list[str]:
    """The layers a reconstruction step re-fits (every Conv2d/Linear, a shared weight once), in module order."""
    tied = weight_aliases(model)
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in tied]


def prunable_layers(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[LayerInfo]:
    """Prunable layers of ``model`` in ``named_modules()`` order.

    Raises ``UserError`` when none is left, since nothing could be allocated, and when an ``include`` or
    ``exclude`` pattern matches no prunable layer.
    """
    found: dict[str, LayerInfo] = {}
    aliases = weight_aliases(model)
    for name, m in model.named_modules():
        if name in aliases:  # a weight tensor shared with an earlier layer is planned once, under that name
            continue
        if isinstance(m, nn.Conv2d):
            found[name] = LayerInfo(name, tuple(m.weight.shape), m.weight.numel(), "conv", m.groups)
        elif isinstance(m, nn.Linear):
            found[name] = LayerInfo(name, tuple(m.weight.shape), m.weight.numel(), "linear")
    for flag, patterns in (("--include", include or ()), ("--exclude", exclude or ())):
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in found)]
        if unmatched:  # a typo would otherwise prune (or protect) other layers than the user meant
            shown = ", ".join(list(found)[:4]) + (", ..." if len(found) > 4 else "")
            raise UserError(
                f"{flag} pattern {unmatched[0]!r} (a flag, config key or a replayed plan's {flag[2:]}) matches no "
                f"prunable layer: use dotted layer names or shell-style patterns over them (this model's: {shown})"
            )
    keep = select_layers(list(found), include, exclude)
    if not keep:
        why = " after include/exclude patterns" if (include or exclude) else ""
        raise UserError(
            f"the model has no prunable layers (Conv2d/Linear){why}: pass a CNN, or loosen --include/--exclude"
        )
    return [found[n] for n in keep]


@torch.no_grad()
def layer_macs(model: nn.Module, layers: list[LayerInfo], example: torch.Tensor) -> np.ndarray:
    """Multiply-accumulates per weight of each layer (its output positions) for one image; a weight tensor
    shared with later layers (tied weights) counts their positions too."""
    pos: dict[str, int] = {}
    owner = {layer.name: layer.name for layer in layers}
    owner.update({alias: first for alias, first in weight_aliases(model).items() if first in owner})

    def make(name: str):
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            per_image = out[0].numel() if out.dim() > 1 else out.numel()
            pos[owner[name]] = pos.get(owner[name], 0) + per_image // mod.weight.shape[0]

        return hook

    with forward_hooks(model, {name: make(name) for name in owner}):
        model(example[:1])
    # grouped convs: each weight is used once per output position of its own output channel
    return np.array([pos[layer.name] for layer in layers], dtype=float)
