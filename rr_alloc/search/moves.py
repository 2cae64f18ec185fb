"""Search spaces anchored at global magnitude (pure functions; the Optuna samplers live in ``samplers.py``).

Two spaces, both with global magnitude as an exact member and every point meeting the budget:

- **multipliers** (CMA-ES): per-layer log-multipliers ``alpha_l`` on the magnitude scores with one global
  threshold, ``score = |w| * exp(alpha_l - mean(alpha))``. ``alpha = 0`` is global magnitude bit for bit
  (the same threshold code on the same scores); the threshold absorbs a common shift, so ``alpha`` is
  centred.
- **block moves** (evolutionary search): per-layer pruned counts; a move shifts
  ``q = step * min(n_i, n_j)`` pruned weights from layer ``i`` to layer ``j`` (EvoPress's equal-weight
  levels do not fit CNN layers spanning 432 to 36,864 weights), so a weight budget stays exact.

RR guidance: which layers give and take pruned weights is drawn from the RR profile's marginal repaired
distortion per pruned weight at the parent's sparsities (``rr_move_probabilities``).
"""

from __future__ import annotations

import numpy as np

from ..allocators.base import AllocationProblem, count_bounds, round_to_budget
from ..allocators.baselines import threshold_sparsities

__all__ = ["multiplier_counts", "count_bounds", "block_moves", "rr_move_probabilities", "fix_cost"]


def multiplier_counts(problem: AllocationProblem, sorted_abs: list[np.ndarray], alpha: np.ndarray) -> np.ndarray:
    """Pruned counts of one global threshold over ``|w| * exp(alpha_l - mean(alpha))``.

    ``sorted_abs``: each layer's ``|w|`` ascending (as ``GlobalMagnitude.sorted_scores``). At ``alpha = 0``
    this is global magnitude exactly.
    """
    a = np.asarray(alpha, float)
    a = a - a.mean()
    scaled = [sc * np.exp(x) for sc, x in zip(sorted_abs, a)]  # a positive factor keeps each layer sorted
    return round_to_budget(problem, threshold_sparsities(problem, scaled))


def fix_cost(problem: AllocationProblem, k: np.ndarray) -> np.ndarray:
    """FLOP budgets: put the MACs that rounding moved back on the cheapest layer with room."""
    if problem.unit == "weights":
        return k
    kmin, kmax = count_bounds(problem)
    a = problem.cost / problem.n  # MACs per pruned weight
    k = k.copy()
    for _ in range(2):  # the second sweep lets a cheap layer take back what a coarse one overshot
        for i in np.argsort(a):
            err = problem.target - float(a @ k)
            k[i] += int(np.clip(round(err / a[i]), kmin[i] - k[i], kmax[i] - k[i]))
    return k


def block_moves(
    problem: AllocationProblem,
    k: np.ndarray,
    step: float,
    n_moves: int,
    rng: np.random.Generator,
    p_donor: np.ndarray | None = None,
    p_recv: np.ndarray | None = None,
) -> np.ndarray:
    """``k`` after ``n_moves`` block moves: layer ``i`` (drawn from ``p_donor``) gets denser by ``q`` weights,
    layer ``j`` (from ``p_recv``) sparser by ``q`` (by the same MACs for FLOP budgets). Bounds always hold."""
    n = problem.n
    kmin, kmax = count_bounds(problem)
    a = problem.cost / n  # budget units per pruned weight (1 for weight budgets)
    L = len(n)
    k = np.asarray(k, np.int64).copy()
    done = tries = 0
    while done < n_moves and tries < 50 * n_moves:
        tries += 1
        i = int(rng.choice(L, p=p_donor))
        j = int(rng.choice(L, p=p_recv))
        if i == j:
            continue
        q = max(1, int(round(step * min(n[i], n[j]))))
        qi = min(q, int(k[i] - kmin[i]))
        qj = int(round(qi * a[i] / a[j]))  # the same budget units in layer j
        qj = min(qj, int(kmax[j] - k[j]))
        qi = qj if problem.unit == "weights" else min(int(round(qj * a[j] / a[i])), int(k[i] - kmin[i]))
        if qi <= 0 or qj <= 0:
            continue
        k[i] -= qi
        k[j] += qj
        done += 1
    return fix_cost(problem, k)


def _slopes(grid: np.ndarray, curve: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Slope of each layer's piecewise-linear curve at its sparsity ``s_l``."""
    seg = np.clip(np.searchsorted(grid, s, side="right") - 1, 0, len(grid) - 2)
    rows = np.arange(len(s))
    return (curve[rows, seg + 1] - curve[rows, seg]) / (grid[seg + 1] - grid[seg])


def rr_move_probabilities(
    problem: AllocationProblem, k: np.ndarray, beta: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(p_donor, p_recv)`` from the RR profile at the sparsities of ``k``.

    The marginal repaired distortion per pruned weight of layer ``l`` is ``w_l * dD_res/ds (s_l) / n_l``.
    Layers where it is small receive pruned weights more often, layers where it is large give them back:
    probabilities ``~ exp(-+beta * rank)``, ranks scaled to [0, 1], so guidance biases the draw (a ratio of
    ``e^beta`` between the extremes) without ever excluding a layer.
    """
    grid, curve = problem.profile.curve("d_res")
    s = np.asarray(k, float) / problem.n
    slope = _slopes(grid, curve, s)
    if problem.layer_weights is not None:
        slope = slope * np.asarray(problem.layer_weights, float)
    marginal = slope / problem.n
    L = len(marginal)
    rank = np.argsort(np.argsort(marginal, kind="stable"), kind="stable") / max(L - 1, 1)
    recv = np.exp(-beta * rank)
    donor = np.exp(beta * rank)
    return donor / donor.sum(), recv / recv.sum()
