"""Choose the rule by measurement: every rule's plan pruned, repaired and scored end to end; the lowest loss wins.

Which rule is best depends on the model: global magnitude on the CIFAR ResNets, LAMP on EfficientNet-Lite,
where global magnitude cuts the depthwise and squeeze layers (docs/RESULTS.md). Scoring each rule on held-out
training images under the repair the plan will get is the choice that does not depend on knowing which.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import ClassVar, TypeVar

import numpy as np

from .base import AllocationProblem, Allocator, Needs, get_allocator, register

__all__ = ["BestRule", "RULES", "choose_rule"]

# The rules scored, in tie-break order: global magnitude (the rule most tools use) first
RULES = ("global", "uniform", "lamp", "erk", "rr-greedy")

C = TypeVar("C")


def choose_rule(plans: Mapping[str, C], loss: Callable[[C], float]) -> tuple[str, dict[str, float]]:
    """The rule whose plan has the lowest ``loss`` (ties to the earlier rule; a NaN loss, a repair that
    diverged, never wins) and every rule's loss."""
    scores = {rule: float(loss(plan)) for rule, plan in plans.items()}
    return min(plans, key=lambda rule: math.inf if math.isnan(scores[rule]) else scores[rule]), scores


@register
class BestRule(Allocator):
    name = "best-rule"
    needs = Needs(weights=True, profile=True, evaluate=True)
    search_options: ClassVar[frozenset[str] | None] = frozenset({"objective", "search_repair"})
    description = (
        "every rule (global, uniform, LAMP, ERK, rr-greedy) pruned, repaired and scored on the selection "
        "split; the lowest loss wins (the search's starting point, without the search)"
    )

    def __init__(self, rules: tuple[str, ...] = RULES) -> None:
        self.rules = rules
        self.scores: dict[str, float] = {}
        self.chosen: str | None = None

    def sparsities(self, problem: AllocationProblem) -> np.ndarray:
        plans = {rule: get_allocator(rule).allocate(problem) for rule in self.rules}
        self.chosen, self.scores = choose_rule(plans, problem.evaluate)
        return plans[self.chosen] / problem.n
