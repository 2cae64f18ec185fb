"""A grouped conv's least-squares statistics: every group's Gram pair from one batched GEMM per batch.

A grouped conv is ``groups`` independent problems (a depthwise conv: one per channel). Its patches are laid out
group by group (``group_patches``: each group's positions contiguous), summed with one batched GEMM, and kept
both batched (``GroupGrams.H``/``R``, for the depthwise fit and the level database) and per group (the
``GramStats`` list every other fit takes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .refit import GramStats, check_patches, input_patches, output_rows, patch_view

__all__ = ["group_patches", "group_outputs", "group_grams", "GroupGrams", "layer_grams"]


def group_patches(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A grouped conv's patches as ``(groups, d_g, positions)``: group ``i``'s columns of ``input_patches``,
    transposed, formed in one copy with every group's positions contiguous (the layout its Gram needs)."""
    v = patch_view(layer, x)
    b, c, ho, wo, kh, kw = v.shape
    g = layer.groups
    v = v.reshape(b, g, c // g, ho, wo, kh, kw).permute(1, 2, 5, 6, 0, 3, 4)
    return v.reshape(g, (c // g) * kh * kw, b * ho * wo)


def group_outputs(layer: nn.Conv2d, y: torch.Tensor) -> torch.Tensor:
    """A grouped conv's output as ``(groups, positions, C_out / groups)``, positions as in ``group_patches``."""
    b, c, ho, wo = y.shape
    g = layer.groups
    return y.reshape(b, g, c // g, ho, wo).permute(1, 0, 3, 4, 2).reshape(g, b * ho * wo, c // g)


def group_grams(batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], groups: int, const: bool) -> GroupGrams:
    """One ``GramStats`` per group of a grouped conv from ``(group_patches, group_outputs)`` batches:
    ``(groups, d_g, positions)`` and ``(groups, positions, C_out / groups)`` (or ``None``: ``H`` only).

    All groups are summed with one batched GEMM per batch, each group's positions contiguous, not one small
    GEMM per group (a depthwise layer has a group per channel, up to a thousand or more).
    """
    n, images, h, sx, r, sy = 0, 0, None, None, None, None
    for x, y, b in batches:
        parts = [torch.bmm(x, x.transpose(1, 2)).double(), x.sum(2).double()]
        if y is not None:
            parts += [torch.bmm(x, y).double(), y.sum(1).double()]
        if h is None:
            h, sx, *rest = parts
            r, sy = rest if rest else (None, None)
        else:
            h += parts[0]
            sx += parts[1]
            if y is not None:
                r += parts[2]
                sy += parts[3]
        n += x.shape[2]
        images += b
    return GroupGrams(groups, const, n, h, sx, r, sy, images)


class GroupGrams(list):
    """A grouped conv's per-group ``GramStats`` (views into the batched sums), and the batched ``H`` and ``R``
    the depthwise fit solves with, so no caller stacks the groups again."""

    def __init__(self, groups: int, const: bool, n: int, h: Any, sx: Any, r: Any, sy: Any, images: int = 0) -> None:
        if h is None:
            super().__init__(GramStats(const) for _ in range(groups))
        else:
            super().__init__(
                GramStats.of_sums(
                    n, h[i], sx[i], None if r is None else r[i], None if sy is None else sy[i], const, images
                )
                for i in range(groups)
            )
        self.n, self._h, self._sx, self._r, self._sy, self.with_const = n, h, sx, r, sy, const
        self.images = images

    @property
    def H(self) -> torch.Tensor:
        """``(groups, D, D)``: each group's ``GramStats.H``."""
        if not self.with_const:
            return self._h
        g, d = self._h.shape[:2]
        out = self._h.new_empty(g, d + 1, d + 1)
        out[:, :d, :d] = self._h
        out[:, :d, d] = out[:, d, :d] = self._sx
        out[:, d, d] = float(self.n)
        return out

    @property
    def R(self) -> torch.Tensor:
        """``(groups, D, C_out / groups)``: each group's ``GramStats.R``."""
        return torch.cat([self._r, self._sy[:, None]], 1) if self.with_const else self._r


def layer_grams(
    name: str, layer: nn.Module, dense_layer: nn.Module, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], const: bool
) -> list[GramStats]:
    """One Gram pair per group of ``layer`` from ``(pruned input, dense input)`` batches."""
    g = getattr(layer, "groups", 1)  # a grouped conv is g independent problems: one Gram pair each

    def rows(patches: Callable, outputs: Callable) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for i, (xp, xd) in enumerate(pairs):
            yd = dense_layer(xd)
            if i == 0:  # the patches must be what the layer really multiplies (padding inside its forward)
                check_patches(name, dense_layer, xd, yd)
            yield patches(layer, xp), outputs(layer, yd), xp.shape[0]

    if g > 1:
        return group_grams(rows(group_patches, group_outputs), g, const)
    gram = GramStats(const)
    for p, y, b in rows(input_patches, output_rows):
        gram.add(p, y, images=b)
    return [gram]
