"""Magnitude masks (unstructured and N:M) and their application.

Unstructured, layer-local: prune exactly ``k = round(s * n)`` smallest ``|w|``;
ties are broken by flat index (stable sort), the convention of
``torch.nn.utils.prune.l1_unstructured`` up to tie order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError

__all__ = [
    "Pruning",
    "n_pruned",
    "magnitude_order",
    "magnitude_mask",
    "nm_mask",
    "nm_masks",
    "parse_pattern",
    "apply_masks",
    "masks_for_plan",
]


def n_pruned(sparsity: float, n: int) -> int:
    """Number of weights pruned at ``sparsity`` (``round``, as torch.nn.utils.prune)."""
    return int(round(float(sparsity) * n))


def magnitude_order(weight: torch.Tensor) -> torch.Tensor:
    """Flat indices of ``weight`` sorted by ascending ``|w|``, ties by index."""
    return torch.sort(weight.detach().abs().flatten(), stable=True).indices


def magnitude_mask(weight: torch.Tensor, k: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean keep-mask with the ``k`` smallest-magnitude weights removed."""
    order = magnitude_order(weight) if order is None else order
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    keep[order[:k]] = False
    return keep.view_as(weight)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor | None:
    """N:M keep-mask over groups of ``m`` consecutive input channels (NVIDIA ASP convention).

    Groups run along the input-channel axis at a fixed output channel and kernel
    position. Returns ``None`` when the input channels are not a multiple of ``m``
    (the layer stays dense).
    """
    if weight.dim() < 2 or weight.shape[1] % m != 0:
        return None
    w = weight.detach().abs().movedim(1, -1)  # (..., C_in)
    g = w.reshape(*w.shape[:-1], w.shape[-1] // m, m)
    # keep the n largest of each group; stable ordering breaks ties by position
    idx = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.reshape(w.shape).movedim(-1, 1).contiguous()


def nm_masks(model: nn.Module, names: list[str], n: int = 2, m: int = 4) -> dict[str, torch.Tensor]:
    """N:M keep-masks of the named layers; layers whose input channels are not a multiple of ``m`` are left out."""
    out = {}
    for name in names:
        keep = nm_mask(model.get_submodule(name).weight, n, m)
        if keep is not None:
            out[name] = keep
    return out


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep N of every M; one-line ``UserError`` on anything else."""
    try:
        if not re.fullmatch(r"[0-9]+:[0-9]+", str(text)):  # exactly what a plan's schema accepts
            raise ValueError(text)
        n, m = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise UserError(f"--pattern must be N:M (keep N of every M input channels), got {text!r}: e.g. --pattern 2:4")
    if not 0 < n < m:
        raise UserError(f"--pattern N:M needs 0 < N < M, got {text!r}: e.g. --pattern 2:4")
    return n, m


@dataclass(frozen=True)
class Pruning:
    """What a plan removes: layer-local magnitude ``counts``, an N:M pattern ``nm`` over ``layers``, or
    explicit keep-``masks``. ``keep_masks`` turns any of them into masks; ``nm`` also tells mask-choosing
    repair steps (``obs``) which pattern to keep."""

    counts: Mapping[str, int] | None = None
    nm: tuple[int, int] | None = None
    layers: tuple[str, ...] = ()
    masks: Mapping[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if (self.counts is not None) + (self.masks is not None) + (self.nm is not None and self.masks is None) != 1:
            raise ValueError("a Pruning holds exactly one of counts, an N:M pattern (nm, layers) or masks")

    @classmethod
    def of(
        cls, value: "Pruning | Mapping[str, int] | Mapping[str, torch.Tensor]", nm: tuple[int, int] | None = None
    ) -> "Pruning":
        """A ``Pruning`` from itself, per-layer counts, or keep-masks (``nm``: the pattern the masks follow)."""
        if isinstance(value, Pruning):
            return value
        if value and isinstance(next(iter(value.values())), torch.Tensor):
            return cls(masks=value, nm=nm)
        if nm is not None:
            raise ValueError("an N:M pattern goes with keep-masks or a Pruning(nm=...), not with counts")
        return cls(counts={k: int(v) for k, v in value.items()})

    def keep_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Keep-masks on ``model``'s layers (N:M layers whose inputs are not a multiple of M stay dense)."""
        if self.masks is not None:
            return dict(self.masks)
        if self.counts is not None:
            return masks_for_plan(model, self.counts)
        return nm_masks(model, list(self.layers), *self.nm)

    def pruned_counts(self, model: nn.Module) -> dict[str, int]:
        """Pruned weights per layer (0 where an N:M layer stays dense)."""
        if self.counts is not None:
            return dict(self.counts)
        masks = self.keep_masks(model)
        names = self.layers or tuple(masks)
        return {n: int((~masks[n]).sum()) if n in masks else 0 for n in names}


def masks_for_plan(model: nn.Module, counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Unstructured keep-masks pruning ``counts[name]`` weights of each named layer."""
    return {name: magnitude_mask(model.get_submodule(name).weight, k) for name, k in counts.items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked-out weights in place (permanent: no reparametrisation left)."""
    for name, keep in masks.items():
        w = model.get_submodule(name).weight
        w.mul_(keep.to(device=w.device, dtype=w.dtype))
