"""Allocators: pure functions from an ``AllocationProblem`` to per-layer pruned counts."""

from .base import (
    ALLOCATORS,
    BUDGET_UNITS,
    AllocationProblem,
    Allocator,
    Needs,
    allocator_class,
    get_allocator,
    register,
    round_to_budget,
)
from .baselines import ERK, LAMP, GlobalMagnitude, Uniform, erk_raw_density, lamp_scores
from .best import RULES, BestRule, choose_rule
from .rr import RRExact, RRGreedy, layer_curves, objective

__all__ = [
    "ALLOCATORS",
    "BUDGET_UNITS",
    "AllocationProblem",
    "Allocator",
    "Needs",
    "allocator_class",
    "get_allocator",
    "register",
    "round_to_budget",
    "ERK",
    "LAMP",
    "GlobalMagnitude",
    "Uniform",
    "erk_raw_density",
    "lamp_scores",
    "RRExact",
    "RRGreedy",
    "layer_curves",
    "objective",
    "RULES",
    "BestRule",
    "choose_rule",
]
