"""The spine's verbs on a session: ``allocate`` a budget with a rule or the search, ``verify`` counts under a
repair pipeline. Both return their results as values (``Allocation``, ``Verification``); a plan is built from
them (``plans.build``).

    from rr_alloc import RunConfig, Session, allocate, verify, build_plan
    session = Session(RunConfig())                       # the embedded digits default
    alloc = allocate(session, "rr-greedy", 0.9)
    check = verify(session, alloc.counts, session.cfg.repair)
    plan = build_plan(session, alloc, check)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from . import evidence
from .allocators import RULES, allocator_class, choose_rule, get_allocator
from .evaluation import PruningLike, repaired_model, score
from .nn.metrics import Metrics
from .repair import RepairPipeline, RepairReport
from .search.runner import SearchProvenance, run_search
from .search.scoring import SelectionScorer
from .session import Session

__all__ = ["Allocation", "Verification", "AnchorChoice", "ANCHOR_RULES", "allocate", "verify", "best_rule"]

# The rules a search may start from: each is scored on the selection split under the search's repair, and the
# best one is the anchor the search improves and the reference its validation check compares against (the
# ``best-rule`` allocator returns it without searching)
ANCHOR_RULES = RULES


@dataclass(frozen=True)
class Allocation:
    """Per-layer pruned counts of ``rule`` at ``budget``; a search's provenance and study ride along."""

    rule: str
    budget: float
    counts: dict[str, int]
    search: SearchProvenance | None = None
    study: Any = field(default=None, repr=False)
    choice: "AnchorChoice | None" = None  # best-rule: which rule won and every rule's selection score


@dataclass(frozen=True)
class AnchorChoice:
    """The best rule at a budget: its name and counts, every rule's selection score (lower is better), and
    what scored them (the repair, the objective and the number of selection images)."""

    rule: str
    counts: dict[str, int]
    scores: dict[str, float]
    repair: str = ""
    objective: str = ""
    images: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The plan's ``rule_choice`` block."""
        return {
            "chosen": self.rule,
            "repair": self.repair,
            "objective": self.objective,
            "selection_size": self.images,
            "scores": dict(self.scores),
        }


@dataclass(frozen=True)
class Verification:
    """A pruned, repaired plan scored against the dense model on each split, and what the repair did."""

    metrics: dict[str, Metrics]
    report: RepairReport

    def __getitem__(self, split: str) -> Metrics:
        return self.metrics[split]


def allocate(
    session: Session, rule: str, budget: float, layer_weights: str | None = None, **options: Any
) -> Allocation:
    """``rule``'s per-layer pruned counts at ``budget`` (deterministic rules memoised on the session).

    ``best-rule`` is ``best_rule``'s choice. A search (``optuna``) starts from it, runs the session's
    configured optimiser on its storage and is never memoised: its result depends on the storage's trials.
    """
    cls = allocator_class(rule)
    t0 = time.perf_counter()
    if rule == "best-rule":
        choice = best_rule(session, budget)
        out = Allocation(rule, float(budget), dict(choice.counts), choice=choice)
    elif cls.needs.evaluate:
        found = run_search(session, budget, best_rule(session, budget))
        out = Allocation(rule, float(budget), found.counts, found.provenance, found.study)
    else:
        key = ("allocation", rule, float(budget), layer_weights or session.cfg.layer_weights, *sorted(options.items()))
        if key not in session.memo:
            problem = evidence.problem(session, budget, cls.needs, layer_weights)
            k = get_allocator(rule, **options).allocate(problem)
            session.memo[key] = {layer.name: int(v) for layer, v in zip(session.layers, k)}
        out = Allocation(rule, float(budget), dict(session.memo[key]))
    session.timings[f"allocate:{rule}"] = time.perf_counter() - t0
    return out


def best_rule(session: Session, budget: float, rules: tuple[str, ...] = ANCHOR_RULES) -> AnchorChoice:
    """Each of ``rules`` at ``budget`` scored on the selection split under the search's repair (every candidate
    pruned and repaired in full); the lowest loss wins, ties to the earlier rule (global magnitude first)."""
    cfg = session.cfg
    key = ("best_rule", float(budget), rules, cfg.loop_repair, cfg.objective)
    if key not in session.memo:
        scorer = SelectionScorer(session, cfg.loop_repair, cfg.objective)
        counts = {r: allocate(session, r, budget).counts for r in rules}
        best, scores = choose_rule(counts, scorer)
        n = session.splits.selection.n
        session.memo[key] = AnchorChoice(best, counts[best], scores, cfg.loop_repair, cfg.objective, n)
    return session.memo[key]


def verify(
    session: Session,
    pruning: PruningLike,
    pipeline: str | RepairPipeline,
    splits: tuple[str, ...] = ("test",),
    nm: tuple[int, int] | None = None,
) -> Verification:
    """Prune -> repair on the calibration split -> score on each of ``splits`` against the dense model.

    ``pruning``: per-layer counts, keep-masks (``nm``: their N:M pattern) or a ``Pruning``.
    """
    model, report = repaired_model(session, pruning, pipeline, nm=nm, progress=session.progress)
    return Verification(score(session, model, splits), report)
