"""RR-driven allocators over the profile's interpolated ``D_res`` curves.

Objective (METHOD.md section 5): ``f = sum_l w_l D_res(l, s_l)`` with ``D_res``
linear between grid points (0 at s = 0), subject to the budget and bounds.
"""

from __future__ import annotations

import heapq

import numpy as np

from .base import AllocationProblem, Allocator, Needs, register

__all__ = ["RRGreedy", "RRExact", "LAYER_WEIGHTS", "layer_curves", "objective"]

LAYER_WEIGHTS = ("uniform", "sensitivity")  # w_l: 1 for every layer, or its measured output sensitivity


def _objective_weights(problem: AllocationProblem) -> np.ndarray:
    """``w_l`` of the objective: the problem's layer weights, or 1 for every layer."""
    if problem.layer_weights is None:
        return np.ones(len(problem.layers))
    return np.asarray(problem.layer_weights, float)


def layer_curves(problem: AllocationProblem, key: str = "d_res") -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer: breakpoints ``s`` within its bounds and weighted objective values there."""
    grid, vals = problem.profile.curve(key)
    w = _objective_weights(problem)
    out = []
    for i in range(len(problem.layers)):
        lo, hi = problem.lower[i], problem.upper[i]
        s = np.unique(np.concatenate([[lo, hi], grid[(grid > lo) & (grid < hi)]]))
        out.append((s, w[i] * np.interp(s, grid, vals[i])))
    return out


def objective(problem: AllocationProblem, s: np.ndarray, key: str = "d_res") -> float:
    """``sum_l w_l D(l, s_l)`` with linear interpolation on the profile grid."""
    grid, vals = problem.profile.curve(key)
    w = _objective_weights(problem)
    return float(sum(w[i] * np.interp(s[i], grid, vals[i]) for i in range(len(s))))


@register
class RRGreedy(Allocator):
    name = "rr-greedy"
    needs = Needs(profile=True)
    description = "greedy on the RR profile: raise the layer whose next step adds least D_res per pruned unit"

    def sparsities(self, problem: AllocationProblem) -> np.ndarray:
        curves = layer_curves(problem)
        c = problem.cost
        s = problem.lower.copy()
        pos = np.zeros(len(curves), dtype=int)  # index of the breakpoint each layer sits at
        remaining = problem.target - float(c @ s)
        heap: list[tuple[float, int, int]] = []

        def push(i: int) -> None:
            bs, vs = curves[i]
            j = pos[i]
            if j + 1 < len(bs):
                slope = (vs[j + 1] - vs[j]) / (c[i] * (bs[j + 1] - bs[j]))
                heapq.heappush(heap, (slope, i, j))

        for i in range(len(curves)):
            push(i)
        while remaining > 1e-9 and heap:
            _, i, j = heapq.heappop(heap)
            bs, _ = curves[i]
            step = c[i] * (bs[j + 1] - bs[j])
            if step >= remaining:  # partial step lands exactly on the budget
                s[i] = bs[j] + remaining / c[i]
                remaining = 0.0
                break
            s[i], pos[i] = bs[j + 1], j + 1
            remaining -= step
            push(i)
        return s


@register
class RRExact(Allocator):
    """Optimal for the separable piecewise-linear objective (mixed-integer LP, HiGHS).

    Each layer picks one segment of its curve (binary ``z``) and a position in it
    (``u <= z``); the budget is one linear equality. Non-convex curves are
    handled exactly; ``last_gap`` holds the solver's reported optimality gap.
    """

    name = "rr-exact"
    needs = Needs(profile=True)
    description = "exact optimum of the same objective (MILP over the piecewise-linear curves)"

    def __init__(self, time_limit: float = 10.0) -> None:
        self.time_limit = time_limit
        self.last_gap: float | None = None

    def sparsities(self, problem: AllocationProblem) -> np.ndarray:
        from scipy.optimize import Bounds, LinearConstraint, milp

        curves = layer_curves(problem)
        c = problem.cost
        segs = [(i, j) for i, (bs, _) in enumerate(curves) for j in range(len(bs) - 1)]
        if not segs:  # every layer fixed by its bounds
            return problem.lower.copy()
        m = len(segs)
        # variables: z_0..z_{m-1} (binary), u_0..u_{m-1} (fraction of the segment, continuous)
        obj = np.zeros(2 * m)
        budget_row = np.zeros(2 * m)
        for k, (i, j) in enumerate(segs):
            bs, vs = curves[i]
            obj[k], obj[m + k] = vs[j], vs[j + 1] - vs[j]
            budget_row[k], budget_row[m + k] = c[i] * bs[j], c[i] * (bs[j + 1] - bs[j])
        rows, lbs, ubs = [budget_row], [problem.target], [problem.target]
        fixed = 0.0
        for i, (bs, _) in enumerate(curves):
            if len(bs) == 1:
                fixed += c[i] * bs[0]
        rows[0] = budget_row
        lbs[0] = ubs[0] = problem.target - fixed
        for i in range(len(curves)):
            row = np.zeros(2 * m)
            for k, (li, _) in enumerate(segs):
                if li == i:
                    row[k] = 1.0
            if row.any():
                rows.append(row)
                lbs.append(1.0)
                ubs.append(1.0)
        link = np.zeros((m, 2 * m))  # u_k - z_k <= 0
        link[np.arange(m), np.arange(m)] = -1.0
        link[np.arange(m), m + np.arange(m)] = 1.0
        A = np.vstack([np.array(rows), link])
        lb = np.concatenate([lbs, np.full(m, -np.inf)])
        ub = np.concatenate([ubs, np.zeros(m)])
        integrality = np.concatenate([np.ones(m), np.zeros(m)])
        res = milp(
            obj,
            constraints=LinearConstraint(A, lb, ub),
            integrality=integrality,
            bounds=Bounds(np.zeros(2 * m), np.ones(2 * m)),
            options={"time_limit": self.time_limit, "mip_rel_gap": 1e-9},
        )
        if res.x is None:
            raise RuntimeError(f"rr-exact: the MILP solver found no solution ({res.message})")
        self.last_gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
        s = problem.lower.copy()
        for i, (bs, _) in enumerate(curves):
            if len(bs) == 1:
                s[i] = bs[0]
        for k, (i, j) in enumerate(segs):
            if res.x[k] > 0.5:
                bs, _ = curves[i]
                s[i] = bs[j] + res.x[m + k] * (bs[j + 1] - bs[j])
        return np.clip(s, problem.lower, problem.upper)
