"""Optuna allocator: end-to-end search for per-layer sparsities, every candidate an Optuna trial.

Three optimisers (``SearchOptions.optimizer``), all started at plans users already have:

- ``evo`` (default): an EvoPress-style (1 + 1) evolutionary search over per-layer pruned counts, started
  at global magnitude. A child is its parent after 1-3 block moves (``anchored.block_moves``: the budget
  stays exact); with ``guidance="rr"`` the layers that give and take pruned weights are drawn from the RR
  profile's marginal repaired distortion at the parent (``anchored.rr_move_probabilities``), re-read for
  every child. The parent is the storage's best full-fidelity (COMPLETE) trial, so a resumed run or
  another worker continues from it. A child is *screened* on a seeded random subset of the selection
  images and scored on the whole split unless the screen is worse than its parent's (ties go on);
  otherwise it is recorded as PRUNED, so scores of different fidelities never mix.
- ``cmaes``: CMA-ES (``samplers.CmaSampler`` on the ``cmaes`` package) over per-layer log-multipliers
  of the magnitude scores (``anchored.multiplier_counts``), ``x0 = 0`` (global magnitude), every trial at
  full fidelity. RR guidance is evo's only: ``cmaes`` and ``tpe-mix`` ignore ``guidance``.
- ``tpe-mix``: TPE over mixes of six anchor plans plus three depth offsets.

The score is measured end to end: prune, repair (the run's pipeline) on the calibration split, loss on
the held-out *selection* split of training images (label-free KL by default). The test split is never
touched. ``OptunaSearch.space`` builds the sampler, warm start and objective of one optimiser (what a
search runner puts on a persistent, shared study); ``allocate`` alone runs them on an in-memory study.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..allocators.base import (
    AllocationProblem,
    Allocator,
    Needs,
    get_allocator,
    register,
    round_to_budget,
    solve_increasing,
)
from ..errors import UserError
from . import study as ost
from .moves import block_moves, count_bounds, multiplier_counts, rr_move_probabilities
from .samplers import ANCHOR, PARENT, PARENT_DISTRIBUTION, CmaSampler, EvoSampler

__all__ = [
    "OptunaSearch",
    "SearchOptions",
    "SearchSpace",
    "ANCHORS",
    "Optimizer",
    "OPTIMIZERS",
    "register_optimizer",
    "get_optimizer",
    "GUIDANCE",
    "SIGMA0",
    "project_log_density",
    "trial_counts",
]

ANCHORS = ("global", "lamp", "erk", "uniform", "rr-greedy", "rr-exact")
_FLOOR = 1e-4  # density floor inside logs (a 0.9999-sparse layer)


def project_log_density(problem: AllocationProblem, u: np.ndarray) -> np.ndarray:
    """Sparsities ``1 - clip(exp(u + t))`` with ``t`` solved to meet the budget exactly."""
    c = problem.cost
    lo_d, hi_d = 1.0 - problem.upper, 1.0 - problem.lower
    kept_target = c.sum() - problem.target

    def kept(t: float) -> float:
        return float(c @ np.clip(np.exp(np.minimum(u + t, 50.0)), lo_d, hi_d))

    t = solve_increasing(kept, kept_target, -60.0 - u.max(), 60.0 - u.min())
    return 1.0 - np.clip(np.exp(u + t), lo_d, hi_d)


def _stages(L: int) -> np.ndarray:
    """Depth terciles: 0 for the first third of layers, 1, 2."""
    return np.minimum(np.arange(L) * 3 // max(L, 1), 2)


GUIDANCE = ("rr", "none")
_ALPHA_RANGE = 3.0  # |log-multiplier| bound of the CMA-ES space (a factor of 20 on a layer's magnitudes)
SIGMA0 = 0.2  # CMA-ES initial step in alpha units: a layer's magnitudes scaled by ~e^0.2 = 1.2 moves its
# sparsity several points
_MOVES = (1, 2, 3)  # block moves per child, and their probabilities: mostly small steps, as in EvoPress
_MOVE_P = (0.5, 0.3, 0.2)


def _param(name: str, prefix: str) -> str:
    return f"{prefix}:{name}"


def trial_counts(trial: Any) -> list[int]:
    """The per-layer pruned counts a trial scored (recorded by every optimiser's objective)."""
    return list(trial.user_attrs["counts"])


@dataclass(frozen=True)
class SearchOptions:
    """What to search: the optimiser, evo's RR guidance and its block-move step (a fraction of a layer)."""

    optimizer: str = "evo"
    guidance: str = "rr"
    step: float = 0.05
    anchor_rule: str = "global"  # the rule the search starts from
    anchor: tuple[int, ...] | None = None  # its per-layer counts (None: global magnitude's on the problem)


@dataclass(frozen=True)
class SearchSpace:
    """One optimiser on one problem: its sampler (given a seed), the warm-start trials and the objective."""

    sampler: Callable[[int], Any]
    enqueue: Callable[[Any], None]
    objective: Callable[[Any], float]


class Optimizer:
    """One optimiser of ``--allocator optuna``: builds its ``SearchSpace`` on a problem. Registered by name
    (``register_optimizer``); ``--optimizer NAME`` selects it."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def space(self, problem: AllocationProblem, options: SearchOptions) -> SearchSpace:
        raise NotImplementedError


OPTIMIZERS: dict[str, type[Optimizer]] = {}  # name -> optimiser class, in registration order


def register_optimizer(cls: type[Optimizer]) -> type[Optimizer]:
    """Class decorator: make ``cls`` selectable as ``--optimizer cls.name``."""
    OPTIMIZERS[cls.name] = cls
    return cls


def get_optimizer(name: str) -> Optimizer:
    """The optimiser registered as ``name`` (an unknown name is a one-line error)."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer {name!r}: use {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]()


def _record(trial: Any, counts: np.ndarray) -> None:
    trial.set_user_attr("counts", [int(k) for k in counts])


@register_optimizer
class Evo(Optimizer):
    """(1 + 1) evolution over per-layer pruned counts from global magnitude: block moves keep the budget exact; with
    RR guidance the layers that give and take are drawn from the profile's marginal repaired distortion."""

    name = "evo"

    def space(self, problem: AllocationProblem, options: SearchOptions) -> SearchSpace:
        import optuna

        guided, step = options.guidance == "rr", options.step
        anchor = np.asarray(options.anchor) if options.anchor is not None else get_allocator("global").allocate(problem)
        names = [_param(n, "k") for n in problem.names]
        score = getattr(problem.evaluate, "score", None)
        kmin, kmax = count_bounds(problem)
        space = {p: optuna.distributions.IntDistribution(int(lo), int(hi)) for p, lo, hi in zip(names, kmin, kmax)}

        def child(k: np.ndarray, rng: np.random.Generator, extra_moves: int) -> np.ndarray:
            """``k`` after 1-3 (+ ``extra_moves``) block moves, drawn by the RR profile (guided) or uniformly."""
            p_donor, p_recv = rr_move_probabilities(problem, k) if guided else (None, None)
            n_moves = int(rng.choice(_MOVES, p=_MOVE_P)) + extra_moves
            return block_moves(problem, k, step, n_moves, rng, p_donor, p_recv)

        def objective(trial: "optuna.Trial") -> float:
            # a retried trial (a killed worker's, re-enqueued with its attributes) already carries its counts:
            # it is scored in full, as the run that died would have been asked to finish it
            retried = "counts" in trial.user_attrs
            parent = trial.suggest_int(PARENT, PARENT_DISTRIBUTION.low, PARENT_DISTRIBUTION.high)
            counts = np.array([trial.suggest_int(p, int(lo), int(hi)) for p, lo, hi in zip(names, kmin, kmax)])
            _record(trial, counts)
            beat = None if retried else _parent_screen(trial, parent)
            if score is None:  # a plain callable: no screening
                return float(problem.evaluate(counts))
            r = score(counts, beat=beat)
            trial.set_user_attr("screen", r.screen)
            if r.full is None:
                raise optuna.TrialPruned(f"screen {r.screen:.4f} on {r.n_screen} images did not beat the parent")
            return r.full

        def enqueue(study: "optuna.Study") -> None:
            study.enqueue_trial(
                {PARENT: -1, **{p: int(k) for p, k in zip(names, anchor)}}, user_attrs={ANCHOR: options.anchor_rule}
            )

        return SearchSpace(lambda seed: EvoSampler(space, anchor, child, seed), enqueue, objective)


@register_optimizer
class CmaEs(Optimizer):
    """CMA-ES over per-layer log-multipliers of the magnitude scores, started at global magnitude (alpha = 0)."""

    name = "cmaes"

    def space(self, problem: AllocationProblem, options: SearchOptions) -> SearchSpace:
        import optuna

        sorted_abs = get_allocator("global").sorted_scores(problem)
        names = [_param(n, "a") for n in problem.names]

        def objective(trial: "optuna.Trial") -> float:
            alpha = np.array([trial.suggest_float(p, -_ALPHA_RANGE, _ALPHA_RANGE) for p in names])
            counts = multiplier_counts(problem, sorted_abs, alpha)
            _record(trial, counts)
            return float(problem.evaluate(counts))

        def enqueue(study: "optuna.Study") -> None:
            study.enqueue_trial({p: 0.0 for p in names}, user_attrs={ANCHOR: "global"})

        def sampler(seed: int) -> CmaSampler:
            # started at the anchor (alpha = 0) with a step much smaller than the +-3 bounds
            return CmaSampler(names, np.zeros(len(names)), SIGMA0, (-_ALPHA_RANGE, _ALPHA_RANGE), seed)

        return SearchSpace(sampler, enqueue, objective)


def anchor_log_densities(problem: AllocationProblem) -> dict[str, np.ndarray]:
    """Log-densities of each anchor rule's plan (floored), what tpe-mix mixes."""
    out = {}
    for name in ANCHORS:
        s = get_allocator(name).sparsities(problem)
        out[name] = np.log(np.maximum(1.0 - s, _FLOOR))
    return out


@register_optimizer
class TpeMix(Optimizer):
    """TPE over mixes of the anchor plans' log-densities plus three depth offsets, warm-started at every anchor."""

    name = "tpe-mix"

    def space(self, problem: AllocationProblem, options: SearchOptions) -> SearchSpace:
        import optuna

        anchors = anchor_log_densities(problem)
        A = np.stack([anchors[k] for k in ANCHORS])  # (K, L)
        stages = _stages(len(problem.layers))

        def plan_of(params: dict[str, float]) -> np.ndarray:
            w = np.array([params[f"w_{k}"] for k in ANCHORS])
            w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
            delta = np.array([params[f"stage{j}"] for j in range(3)])
            return project_log_density(problem, w @ A + delta[stages])

        def objective(trial: "optuna.Trial") -> float:
            params = {f"w_{k}": trial.suggest_float(f"w_{k}", 0.0, 1.0) for k in ANCHORS}
            params.update({f"stage{j}": trial.suggest_float(f"stage{j}", -1.5, 1.5) for j in range(3)})
            counts = round_to_budget(problem, plan_of(params))
            _record(trial, counts)
            return float(problem.evaluate(counts))

        def enqueue(study: "optuna.Study") -> None:  # warm start: every anchor plan, exactly
            for k in ANCHORS:
                params = {f"w_{j}": float(j == k) for j in ANCHORS}
                params.update({f"stage{j}": 0.0 for j in range(3)})
                study.enqueue_trial(params, user_attrs={ANCHOR: k})

        def sampler(seed: int) -> "optuna.samplers.BaseSampler":
            # constant_liar: concurrent workers treat each other's running trials as bad, so they spread out
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(len(ANCHORS) + 2, 8), constant_liar=True)

        return SearchSpace(sampler, enqueue, objective)


@register
class OptunaSearch(Allocator):
    name = "optuna"
    needs = Needs(weights=True, profile=True, evaluate=True)
    search_options = None  # every search flag
    description = (
        "end-to-end search from the best rule (every rule scored under the repair first; evo: block moves "
        "guided by RR; cmaes; tpe-mix), scored on the selection split"
    )

    def __init__(self, options: SearchOptions | None = None, n_trials: int = 30, timeout: float | None = None) -> None:
        self.options = options or SearchOptions()
        self.n_trials, self.timeout = n_trials, timeout
        self.study = None

    def space(self, problem: AllocationProblem) -> SearchSpace:
        """The sampler, warm start and objective of the configured optimiser on ``problem``."""
        return get_optimizer(self.options.optimizer).space(problem, self.options)

    def sparsities(self, problem: AllocationProblem) -> np.ndarray:
        """Run the search on an in-memory study (a search runner uses ``space`` on a persistent one)."""
        import optuna

        missing = self.needs.missing(problem)
        if missing:
            raise UserError(f"allocator {self.name!r} needs {missing}, which this run does not provide")
        space = self.space(problem)
        optuna.logging.set_verbosity(logging.WARNING)
        study, _ = ost.open_study(
            "rr_alloc",
            optuna.storages.InMemoryStorage(),
            space.sampler,
            problem.seed,
            space.enqueue,
            log=lambda s: None,
        )
        ost.optimize(study, space.objective, ost.StudySettings(self.n_trials, self.timeout))
        self.study = study
        return np.asarray(trial_counts(ost.best_trial(study)), float) / problem.n


def _parent_screen(trial: Any, parent: int) -> float | None:
    """The parent's screen score (None without a parent, a stored parent or a screen), recorded on the child."""
    if parent < 0:
        return None
    found = next((t for t in trial.study.get_trials(deepcopy=False) if t.number == parent), None)
    if found is None:
        return None
    trial.set_user_attr("parent", parent)
    screen = found.user_attrs.get("screen")
    if screen is not None:
        trial.set_user_attr("parent_screen", screen)
    return screen
