"""The allocations users already know: uniform, global magnitude, LAMP, ERK.

Threshold rules (global, LAMP) honour per-layer bounds by clip-and-rethreshold:
each layer's sparsity at threshold ``t`` is clipped to its bounds and ``t`` is
re-solved so the clipped total meets the budget (METHOD.md section 5).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import AllocationProblem, Allocator, Needs, register, solve_clipped_scale

__all__ = ["Uniform", "GlobalMagnitude", "LAMP", "ERK", "lamp_scores", "erk_raw_density", "threshold_sparsities"]


@register
class Uniform(Allocator):
    name = "uniform"
    description = "the same sparsity in every layer (clipped to bounds, re-solved)"

    def sparsities(self, problem: AllocationProblem) -> np.ndarray:
        L = len(problem.layers)
        t = solve_clipped_scale(
            problem.cost, lambda t: np.full(L, t), problem.lower, problem.upper, problem.target, 0.0, 1.0
        )
        return np.clip(np.full(L, t), problem.lower, problem.upper)


class _ScoreThreshold(Allocator):
    """One global threshold over per-weight scores; layer sparsity = share of scores below it."""

    needs = Needs(weights=True)

    def scores(self, w: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def sorted_scores(self, problem: AllocationProblem) -> list[np.ndarray]:
        """Each layer's scores, ascending (float64)."""
        return [np.sort(self.scores(problem.weights[l.name]).astype(np.float64)) for l in problem.layers]

    def sparsities(self, problem: AllocationProblem) -> np.ndarray:
        return threshold_sparsities(problem, self.sorted_scores(problem))


def threshold_sparsities(problem: AllocationProblem, sorted_scores: list[np.ndarray]) -> np.ndarray:
    """Sparsities of one global threshold over per-weight scores (each layer's array sorted ascending).

    A layer's sparsity is the share of its scores below the threshold, clipped to its bounds; the threshold
    is the exact score at which the clipped total meets the budget (weights tied there split the remainder).
    """
    n = problem.n.astype(float)

    def raw(t: float) -> np.ndarray:
        return np.array([np.searchsorted(sc, t, side="right") for sc in sorted_scores]) / n

    c = problem.cost

    def total(t: float) -> float:
        return float(c @ np.clip(raw(t), problem.lower, problem.upper))

    # bisection over the sorted union of scores: exact threshold between two scores
    allv = np.unique(np.concatenate(sorted_scores))
    lo, hi = 0, len(allv) - 1
    if total(allv[0]) >= problem.target:
        hi = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if total(allv[mid]) < problem.target:
            lo = mid + 1
        else:
            hi = mid
    t_hi = allv[hi]
    t_lo = allv[hi - 1] if hi > 0 else -np.inf
    s_hi = np.clip(raw(t_hi), problem.lower, problem.upper)
    s_lo = np.clip(raw(t_lo), problem.lower, problem.upper) if hi > 0 else problem.lower.copy()
    # weights tied at the threshold score: take the needed share of them (rounding decides which)
    gap_hi, gap_lo = c @ s_hi, c @ s_lo
    a = 0.0 if gap_hi == gap_lo else (problem.target - gap_lo) / (gap_hi - gap_lo)
    return s_lo + np.clip(a, 0, 1) * (s_hi - s_lo)


@register
class GlobalMagnitude(_ScoreThreshold):
    name = "global"
    description = "global magnitude: one |w| threshold across all layers"

    def scores(self, w: torch.Tensor) -> np.ndarray:
        return w.detach().abs().flatten().double().cpu().numpy()


def lamp_scores(w: torch.Tensor) -> np.ndarray:
    """LAMP score of each weight: ``w_u^2 / sum_{v >= u} w_v^2`` over the layer sorted by ``|w|``."""
    w2 = w.detach().flatten().double().cpu().numpy() ** 2
    order = np.argsort(w2, kind="stable")
    sorted_w2 = w2[order]
    suffix = np.cumsum(sorted_w2[::-1])[::-1]
    out = np.empty_like(w2)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[order] = np.where(suffix > 0, sorted_w2 / suffix, 0.0)
    return out


@register
class LAMP(_ScoreThreshold):
    name = "lamp"
    description = "LAMP (Lee et al. 2021): layer-adaptive magnitude scores, one global threshold"

    def scores(self, w: torch.Tensor) -> np.ndarray:
        return lamp_scores(w)


def erk_raw_density(shape: tuple[int, ...]) -> float:
    """ERK's unscaled density ``(sum of dims) / (prod of dims)`` of a weight shape."""
    return float(sum(shape)) / float(np.prod(shape))


@register
class ERK(Allocator):
    name = "erk"
    description = "Erdos-Renyi-Kernel (Evci et al. 2020): density ~ (sum dims)/(prod dims)"

    def sparsities(self, problem: AllocationProblem) -> np.ndarray:
        r = np.array([erk_raw_density(l.shape) for l in problem.layers])
        lo_d, hi_d = 1.0 - problem.upper, 1.0 - problem.lower
        c = problem.cost
        # dense-layer iteration, generalised to bounds: densities clip, the scale re-solves
        eps = solve_clipped_scale(c, lambda e: e * r, lo_d, hi_d, c.sum() - problem.target, 0.0, 2.0 / r.min())
        return 1.0 - np.clip(eps * r, lo_d, hi_d)
