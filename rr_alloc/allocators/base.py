"""The allocator interface: a pure function from a problem to per-layer pruned counts.

Every allocator sees the same ``AllocationProblem`` (layer shapes, budget,
bounds, and whatever evidence it needs: weights for magnitude rules, the RR
profile for RR rules, a candidate scorer for search) and returns
continuous per-layer sparsities; ``Allocator.allocate`` turns them into
integer counts that meet the budget exactly (weights) or to within one
weight per layer (FLOPs).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import UserError
from ..nn.layers import LayerInfo

__all__ = [
    "AllocationProblem",
    "CandidateScorer",
    "Allocator",
    "Needs",
    "ALLOCATORS",
    "register",
    "get_allocator",
    "allocator_class",
    "round_to_budget",
    "count_bounds",
    "solve_increasing",
    "solve_clipped_scale",
    "BUDGET_UNITS",
]

BUDGET_UNITS = ("weights", "flops")


@runtime_checkable
class CandidateScorer(Protocol):
    """The end-to-end loss of per-layer pruned counts (in layer order); lower is better.

    A scorer may also offer ``score(counts, beat=None)`` returning a ``Screened`` (a cheap screen first,
    the full score only when the screen does not lose to ``beat``): the evolutionary search then screens.
    """

    def __call__(self, counts: np.ndarray) -> float: ...


@dataclass(frozen=True)
class Needs:
    """The evidence an allocator reads from its problem (so a run computes only that).

    ``weights``: the layers' weight tensors (magnitude rules); ``profile``: the RR profile (and
    layer weights of its objective); ``evaluate``: a ``CandidateScorer`` (search).
    """

    weights: bool = False
    profile: bool = False
    evaluate: bool = False

    def missing(self, problem: "AllocationProblem") -> str | None:
        """The first needed field the problem does not provide, or ``None``."""
        for name in ("weights", "profile", "evaluate"):
            if getattr(self, name) and getattr(problem, name) is None:
                return name
        return None


@dataclass
class AllocationProblem:
    """Everything an allocator may use. Sparsities are fractions of each layer's weights.

    ``macs_per_weight``: multiply-accumulates per weight (output positions), used
    when ``unit == "flops"``: the budget is then the fraction of prunable-layer
    MACs removed, ``sum_l a_l n_l s_l = B sum_l a_l n_l``.
    """

    layers: list[LayerInfo]
    budget: float
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    unit: str = "weights"
    macs_per_weight: np.ndarray | None = None
    weights: Mapping[str, torch.Tensor] | None = None
    profile: Any = None  # RRProfile
    layer_weights: np.ndarray | None = None  # objective weights w_l for RR allocators
    evaluate: CandidateScorer | None = None  # per-layer counts -> end-to-end loss (search allocators)
    seed: int = 0

    def __post_init__(self) -> None:
        L = len(self.layers)
        if not 0.0 < self.budget < 1.0:
            raise UserError(f"budget must lie in (0, 1), got {self.budget}: pass a fraction such as 0.9")
        if self.unit not in BUDGET_UNITS:
            raise UserError(f"unknown budget unit {self.unit!r}: use {' or '.join(BUDGET_UNITS)}")
        self.lower = np.zeros(L) if self.lower is None else np.asarray(self.lower, float)
        self.upper = np.full(L, 0.99) if self.upper is None else np.asarray(self.upper, float)
        if self.unit == "flops" and self.macs_per_weight is None:
            raise ValueError("a FLOP budget needs macs_per_weight")
        if np.any(self.lower > self.upper):
            raise UserError("a layer's minimum sparsity exceeds its maximum: check the bounds")
        total = int(self.n.sum())
        if self.unit == "weights" and total and round(self.budget * total) == 0:
            raise UserError(
                f"budget {self.budget} prunes no weight of the {total} prunable weights: pass at least {1 / total:.2g}"
            )
        lo, hi = self.feasible_range()
        if not lo - 1e-12 <= self.budget <= hi + 1e-12:
            raise UserError(
                f"budget {self.budget} is unreachable within the per-layer bounds "
                f"(reachable: {lo:.4f} to {hi:.4f}): raise --s-max or lower the budget"
            )

    @property
    def n(self) -> np.ndarray:
        return np.array([l.n_weights for l in self.layers], dtype=np.int64)

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def cost(self) -> np.ndarray:
        """Budget units per unit of sparsity of each layer (weights or MACs)."""
        n = self.n.astype(float)
        return n if self.unit == "weights" else n * np.asarray(self.macs_per_weight, float)

    @property
    def target(self) -> float:
        return self.budget * self.cost.sum()

    def feasible_range(self) -> tuple[float, float]:
        c = self.cost
        return float(c @ self.lower / c.sum()), float(c @ self.upper / c.sum())

    def achieved(self, counts: np.ndarray | Mapping[str, int]) -> float:
        """Budget-unit sparsity of integer pruned ``counts`` (per layer in order, or by layer name)."""
        if isinstance(counts, Mapping):
            counts = [counts[l.name] for l in self.layers]
        s = np.asarray(counts, float) / self.n
        return float(self.cost @ s / self.cost.sum())


def count_bounds(problem: AllocationProblem) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest pruned count of each layer within its sparsity bounds."""
    n = problem.n
    kmin = np.ceil(problem.lower * n - 1e-9).astype(np.int64)
    kmax = np.floor(problem.upper * n + 1e-9).astype(np.int64)
    return kmin, kmax


def round_to_budget(problem: AllocationProblem, s: np.ndarray) -> np.ndarray:
    """Integer pruned counts from continuous sparsities, meeting the budget.

    Weight budgets: ``sum k_l = round(B * N)`` exactly, by largest remainder
    within each layer's bounds (each layer within one weight of ``s_l n_l``).
    FLOP budgets: each ``k_l = round(s_l n_l)`` (within one weight per layer).
    """
    n = problem.n
    s = np.clip(np.asarray(s, float), problem.lower, problem.upper)
    kmin, kmax = count_bounds(problem)
    if problem.unit == "flops":
        return np.clip(np.round(s * n).astype(np.int64), kmin, kmax)
    exact = s * n
    k = np.clip(np.floor(exact + 1e-9).astype(np.int64), kmin, kmax)
    target = int(round(problem.budget * int(n.sum())))
    diff = target - int(k.sum())
    frac = exact - k
    order = np.argsort(-frac, kind="stable") if diff > 0 else np.argsort(frac, kind="stable")
    step = 1 if diff > 0 else -1
    # walk layers by remainder; a second sweep only happens when bounds bind
    while diff != 0:
        moved = False
        for i in order:
            if diff == 0:
                break
            if (step > 0 and k[i] < kmax[i]) or (step < 0 and k[i] > kmin[i]):
                k[i] += step
                diff -= step
                moved = True
        if not moved:
            raise UserError("budget cannot be met exactly within the per-layer bounds: loosen the bounds")
    return k


def solve_increasing(fn: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 200) -> float:
    """Bisection for ``fn(t) = target`` with ``fn`` non-decreasing on ``[lo, hi]``."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if fn(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, abs(hi)):
            break
    return 0.5 * (lo + hi)


def solve_clipped_scale(
    cost: np.ndarray,
    f: Callable[[float], np.ndarray],
    lo: np.ndarray,
    hi: np.ndarray,
    target: float,
    x_lo: float,
    x_hi: float,
) -> float:
    """The scale ``x`` with ``cost @ clip(f(x), lo, hi) = target``, ``f`` non-decreasing in ``x``.

    Uniform sparsity (``f(t) = t``) and ERK densities (``f(eps) = eps * r``) are both this: values
    that hit a bound clip there and the scale re-solves so the rest meets the target.
    """
    return solve_increasing(lambda x: float(cost @ np.clip(f(x), lo, hi)), target, x_lo, x_hi)


class Allocator(abc.ABC):
    """Base class: subclasses implement ``sparsities`` (continuous, within bounds)."""

    name: ClassVar[str]
    needs: ClassVar[Needs] = Needs()
    search_options: ClassVar[frozenset[str] | None] = frozenset()  # the search flags it reads (None: every one)
    description: ClassVar[str] = ""

    @abc.abstractmethod
    def sparsities(self, problem: AllocationProblem) -> np.ndarray:
        """Per-layer sparsities meeting the budget (before integer rounding)."""

    def allocate(self, problem: AllocationProblem) -> np.ndarray:
        """Integer pruned counts per layer, meeting the budget (see ``round_to_budget``)."""
        missing = self.needs.missing(problem)
        if missing:
            raise UserError(f"allocator {self.name!r} needs {missing}, which this run does not provide")
        return round_to_budget(problem, self.sparsities(problem))


ALLOCATORS: dict[str, type[Allocator]] = {}


def register(cls: type[Allocator]) -> type[Allocator]:
    ALLOCATORS[cls.name] = cls
    return cls


def allocator_class(name: str) -> type[Allocator]:
    """The registered allocator class; one-line ``UserError`` for an unknown name."""
    if name not in ALLOCATORS:
        raise UserError(f"unknown allocator {name!r}: use one of {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name]


def get_allocator(name: str, **kwargs: Any) -> Allocator:
    return allocator_class(name)(**kwargs)
