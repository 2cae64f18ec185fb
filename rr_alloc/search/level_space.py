"""Evolutionary search over database levels: every candidate one level per layer, scored stitched.

The space is one integer level per prunable layer on that layer's ladder (``level_db.ladder``: geometric in
density, the anchor's counts among the levels). A child is its parent after 1-3 *level moves*: one layer
(drawn from the RR guidance's donors, or uniformly) one level denser, another one level sparser; then the
pruned budget is brought back into the band ``[target, target + band * total]`` by single level steps (a
candidate never prunes less than the budget, so no child wins by pruning less). The candidate's plan is its
levels' sparsities scaled onto the budget and rounded to per-layer counts that meet it exactly
(``round_to_budget``); those counts, never the stitched model, are what the plan and the verification use.

Each candidate is an Optuna trial (``v:<layer>`` parameters and the parent's trial number), scored by the
stitched scorer's stages (``stitched.StitchedScorer``); a child stopped at a stage is PRUNED.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..allocators.base import AllocationProblem, round_to_budget
from ..errors import UserError
from ..repair import RepairPipeline
from ..repair.reconstruct import ReconstructStep
from .moves import rr_move_probabilities
from .samplers import ANCHOR, PARENT, PARENT_DISTRIBUTION, EvoSampler

__all__ = ["LevelSpace", "level_moves", "into_band", "level_counts", "level_rule", "DEFAULT_BAND"]

DEFAULT_BAND = 0.002  # a candidate prunes at most 0.2% of the total budget units beyond the budget
_MOVES = (1, 2, 3)
_MOVE_P = (0.5, 0.3, 0.2)


def into_band(
    ladders: Sequence[np.ndarray],
    lv: np.ndarray,
    a: np.ndarray,
    target: float,
    hi: float,
    rng: np.random.Generator,
    p_up: np.ndarray | None = None,
    p_down: np.ndarray | None = None,
    tries: int = 200,
) -> np.ndarray | None:
    """``lv`` moved by single level steps until its pruned cost ``sum a_l k_l`` lies in ``[target, hi]``;
    ``None`` when no walk of ``tries`` steps gets there. ``a``: budget units per pruned weight."""
    lv = lv.copy()
    L = len(lv)
    for _ in range(tries):
        cost = float(sum(a[i] * ladders[i][lv[i]] for i in range(L)))
        if target - 1e-9 <= cost <= hi + 1e-9:
            return lv
        if cost < target:  # prune more: any layer with a sparser level
            ok = np.array([lv[i] + 1 < len(ladders[i]) for i in range(L)])
            p = _restrict(p_up, ok)
            if p is None:
                return None
            i = int(rng.choice(L, p=p))
            lv[i] += 1
        else:  # prune less, preferring a step that stays at or above the budget
            step = np.array(
                [a[i] * (ladders[i][lv[i]] - ladders[i][lv[i] - 1]) if lv[i] > 0 else np.inf for i in range(L)]
            )
            fits = step <= cost - target + 1e-9
            p = _restrict(p_down, fits) if fits.any() else _restrict(p_down, np.isfinite(step))
            if p is None:
                return None
            i = int(rng.choice(L, p=p))
            lv[i] -= 1
    return None


def _restrict(p: np.ndarray | None, ok: np.ndarray) -> np.ndarray | None:
    if not ok.any():
        return None
    q = (np.ones(len(ok)) if p is None else np.asarray(p, float)) * ok
    return q / q.sum() if q.sum() > 0 else ok / ok.sum()


def level_moves(
    ladders: Sequence[np.ndarray],
    lv: np.ndarray,
    n_moves: int,
    rng: np.random.Generator,
    p_donor: np.ndarray | None = None,
    p_recv: np.ndarray | None = None,
) -> np.ndarray:
    """``lv`` after ``n_moves`` moves: a donor layer one level denser, a receiver one level sparser."""
    lv = np.asarray(lv, np.int64).copy()
    L = len(lv)
    done = tries = 0
    while done < n_moves and tries < 50 * n_moves:
        tries += 1
        i = int(rng.choice(L, p=p_donor))
        j = int(rng.choice(L, p=p_recv))
        if i == j or lv[i] == 0 or lv[j] + 1 >= len(ladders[j]):
            continue
        lv[i] -= 1
        lv[j] += 1
        done += 1
    return lv


def level_counts(problem: AllocationProblem, ladders: Sequence[np.ndarray], lv: np.ndarray) -> np.ndarray:
    """The plan of levels ``lv``: their sparsities scaled onto the budget, rounded to exact per-layer counts."""
    k = np.array([ladders[i][lv[i]] for i in range(len(lv))], float)
    s = k / problem.n
    cost = float(problem.cost @ s)
    if cost > 0:
        s = s * (problem.target / cost)
    return round_to_budget(problem, np.clip(s, problem.lower, problem.upper))


class LevelSpace:
    """The level search on ``problem`` (its ``evaluate`` a ``StitchedScorer``) over ``ladders`` (one per
    problem layer), from the anchor's levels; ``guided``: moves drawn by the RR profile's marginals."""

    def __init__(
        self,
        problem: AllocationProblem,
        ladders: Sequence[np.ndarray],
        anchor: np.ndarray,
        guided: bool,
        band: float = DEFAULT_BAND,
    ) -> None:
        self.problem, self.ladders, self.anchor, self.guided = problem, list(ladders), np.asarray(anchor), guided
        self.names = [f"v:{n}" for n in problem.names]
        self.a = problem.cost / problem.n
        self.target = float(problem.target)
        self.hi = self.target + band * float(problem.cost.sum())

    def counts(self, lv: np.ndarray) -> np.ndarray:
        """Pruned counts of each layer at levels ``lv`` (on the ladders: what the stitched model prunes)."""
        return np.array([self.ladders[i][lv[i]] for i in range(len(lv))], np.int64)

    def child(self, lv: np.ndarray, rng: np.random.Generator, extra_moves: int) -> np.ndarray:
        """A child of ``lv`` inside the band (``lv`` itself when none is found: the sampler redraws)."""
        p_donor, p_recv = rr_move_probabilities(self.problem, self.counts(lv)) if self.guided else (None, None)
        n_moves = int(rng.choice(_MOVES, p=_MOVE_P)) + extra_moves
        moved = level_moves(self.ladders, lv, n_moves, rng, p_donor, p_recv)
        out = into_band(self.ladders, moved, self.a, self.target, self.hi, rng, p_recv, p_donor)
        return lv if out is None else out

    def sampler(self, seed: int) -> EvoSampler:
        import optuna

        space = {p: optuna.distributions.IntDistribution(0, len(lad) - 1) for p, lad in zip(self.names, self.ladders)}
        return EvoSampler(space, self.anchor, self.child, seed)

    def enqueue(self, study: Any) -> None:
        study.enqueue_trial(
            {PARENT: -1, **{p: int(v) for p, v in zip(self.names, self.anchor)}}, user_attrs={ANCHOR: "global"}
        )

    def objective(self, trial: Any) -> float:
        import optuna

        scorer = self.problem.evaluate
        retried = "counts" in trial.user_attrs  # a killed worker's trial: scored in full
        parent = trial.suggest_int(PARENT, PARENT_DISTRIBUTION.low, PARENT_DISTRIBUTION.high)
        lv = np.array([trial.suggest_int(p, 0, len(lad) - 1) for p, lad in zip(self.names, self.ladders)])
        trial.set_user_attr("counts", [int(k) for k in level_counts(self.problem, self.ladders, lv)])
        trial.set_user_attr("level_counts", [int(k) for k in self.counts(lv)])
        beat = None if retried else _parent_stages(trial, parent)
        levels = dict(zip(self.problem.names, (int(v) for v in lv)))
        r = scorer.score_levels(scorer.all_levels(levels), beat=beat)
        trial.set_user_attr("stages", list(r.stages))
        trial.set_user_attr("screen", r.stages[0] if r.stages else r.full)  # an evaluated trial (optuna_study)
        if r.full is None:
            raise optuna.TrialPruned(f"stage {len(r.stages)} ({r.sizes[len(r.stages) - 1]} images) lost to the parent")
        return r.full


def _parent_stages(trial: Any, parent: int) -> list[float] | None:
    """The parent's stage means (None without a parent or stored stages), recorded on the child."""
    if parent < 0:
        return None
    found = next((t for t in trial.study.get_trials(deepcopy=False) if t.number == parent), None)
    if found is None or "stages" not in found.user_attrs:
        return None
    trial.set_user_attr("parent", parent)
    return list(found.user_attrs["stages"])


def level_rule(level_inputs: str, search_repair: str) -> str | None:
    """How the level search scores candidates (``--level-inputs``: an input rule of the level database, or
    ``off`` for the full sequential pipeline) under ``search_repair``, or ``None`` when that repair does not
    reconstruct (candidates then move by ``--search-step`` fractions). A contradictory value is refused."""
    rule = level_inputs
    steps = RepairPipeline.parse(search_repair).steps
    reconstructs = bool(steps) and isinstance(steps[0], ReconstructStep)
    if not reconstructs:
        if rule in ("auto", "off"):
            return None
        raise UserError(
            f"--level-inputs {rule} needs a search repair that starts with a reconstruction (lsq or obs), "
            f"got {search_repair!r}: pass --search-repair obs>bn>naive@block+logits or --level-inputs off"
        )
    return "anchor" if rule == "auto" else rule
