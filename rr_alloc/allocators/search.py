"""Optuna allocator: end-to-end search over a low-dimensional family of plans.

Family (all projected onto the budget): per-layer log-densities are a
weighted mix of *anchor* plans (global magnitude, LAMP, ERK, uniform, RR
greedy, RR exact) plus one offset per depth tercile of the network:

    log d_l = sum_k w_k log d_l^(k) / sum_k w_k + delta_{stage(l)} + t,

where ``t`` is solved so the plan meets the budget exactly (densities clip to
the per-layer bounds). Every anchor is a member (one-hot ``w``, zero
offsets) and is enqueued first, so the search starts from the plans users
already have and can only improve on them on its objective.

The objective is measured end to end: prune, repair (the run's pipeline) on the
calibration split, evaluate on the held-out *selection* split of training
images -- label-free by default (mean KL to the dense model's logits). The
test split is never touched. Studies persist in any Optuna storage (SQLite by
default) and resume: rerunning with the same storage adds ``n_trials``.
"""

from __future__ import annotations

import logging

import numpy as np

from .. import optuna_storage as ost
from .base import AllocationProblem, Allocator, Needs, get_allocator, register, round_to_budget, solve_increasing

__all__ = ["OptunaSearch", "ANCHORS", "project_log_density"]

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


@register
class OptunaSearch(Allocator):
    name = "optuna"
    needs = Needs(weights=True, profile=True, evaluate=True)
    description = "Optuna (TPE) over mixes of the baseline and RR plans, scored end to end on the selection split"

    def __init__(self, n_trials: int | None = None, timeout: float | None = None, storage: str | None = None,
                 study_name: str | None = None) -> None:
        self.n_trials, self.timeout, self.storage, self.study_name = n_trials, timeout, storage, study_name
        self.study = None

    def anchors(self, problem: AllocationProblem) -> dict[str, np.ndarray]:
        out = {}
        for name in ANCHORS:
            s = get_allocator(name).sparsities(problem)
            out[name] = np.log(np.maximum(1.0 - s, _FLOOR))
        return out

    def sparsities(self, problem: AllocationProblem) -> np.ndarray:
        import optuna

        opts = problem.options
        settings = ost.StudySettings.from_options(
            {**opts, "n_trials": self.n_trials if self.n_trials is not None else int(opts.get("n_trials", 30)),
             "timeout": self.timeout if self.timeout is not None else opts.get("timeout")})
        storage = ost.open_storage(self.storage or opts.get("storage"), settings)
        name = self.study_name or opts.get("study_name") or "rr_alloc"
        anchors = self.anchors(problem)
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
            trial.set_user_attr("counts", [int(k) for k in counts])
            return float(problem.evaluate(counts))

        def enqueue_anchors(study: "optuna.Study") -> None:  # warm start: every anchor plan, exactly
            for k in ANCHORS:
                params = {f"w_{j}": float(j == k) for j in ANCHORS}
                params.update({f"stage{j}": 0.0 for j in range(3)})
                study.enqueue_trial(params)

        def sampler(seed: int) -> "optuna.samplers.BaseSampler":
            # constant_liar: concurrent workers treat each other's running trials as bad, so they spread out
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(len(ANCHORS) + 2, 8),
                                              constant_liar=True)

        optuna.logging.set_verbosity(logging.WARNING)
        study, _ = ost.open_study(name, storage, sampler, problem.seed, enqueue_anchors,
                                  load_only=settings.n_trials == 0)
        ost.optimize(study, objective, settings)
        self.study = study
        best = ost.best_trial(study)
        return np.asarray(best.user_attrs["counts"], float) / problem.n
