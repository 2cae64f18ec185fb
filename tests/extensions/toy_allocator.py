"""A new allocator in one file: the first and last layers stay dense, the rest share the budget uniformly."""

import numpy as np

from rr_alloc.allocators import AllocationProblem, Allocator, register
from rr_alloc.allocators.base import solve_clipped_scale


@register
class EndsDense(Allocator):
    name = "toy-ends-dense"
    description = "first and last layer dense, the same sparsity in every other layer"

    def sparsities(self, problem: AllocationProblem) -> np.ndarray:
        inner = np.ones(len(problem.layers))
        inner[[0, -1]] = 0.0
        upper = np.minimum(problem.upper, inner)  # the ends may not be pruned

        def shape(t: float) -> np.ndarray:
            return t * inner

        t = solve_clipped_scale(problem.cost, shape, problem.lower, upper, problem.target, 0.0, 1.0)
        return np.clip(shape(t), problem.lower, upper)
