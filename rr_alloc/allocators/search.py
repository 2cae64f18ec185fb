"""Optuna allocator: end-to-end search for per-layer sparsities, every candidate an Optuna trial.

Three optimisers (``options["optimizer"]``), all started at plans users already have:

- ``evo`` (default): an EvoPress-style (1 + 1) evolutionary search over per-layer pruned counts, started
  at global magnitude. A child is its parent after 1-3 block moves (``anchored.block_moves``: the budget
  stays exact); with ``guidance="rr"`` the layers that give and take pruned weights are drawn from the RR
  profile's marginal repaired distortion at the parent (``anchored.rr_move_probabilities``), re-read for
  every child. The parent is the storage's best full-fidelity (COMPLETE) trial, so a resumed run or
  another worker continues from it. A child is *screened* on a seeded random subset of the selection
  images and scored on the whole split unless the screen is worse than its parent's (ties go on);
  otherwise it is recorded as PRUNED, so scores of different fidelities never mix.
- ``cmaes``: Optuna's CMA-ES over per-layer log-multipliers of the magnitude scores
  (``anchored.multiplier_counts``), ``x0 = 0`` (global magnitude), every trial at full fidelity. RR
  guidance is evo's only: ``cmaes`` and ``tpe-mix`` ignore ``guidance``.
- ``tpe-mix``: TPE over mixes of six anchor plans plus three depth offsets (version 0.1's family).

The score is measured end to end: prune, repair (the run's pipeline) on the calibration split, loss on
the held-out *selection* split of training images (label-free KL by default). The test split is never
touched. Studies persist in any Optuna storage (SQLite by default) and resume: rerunning with the same
storage adds ``n_trials``.
"""

from __future__ import annotations

import logging

import numpy as np

from .. import optuna_storage as ost
from ..errors import UserError
from .anchored import block_moves, count_bounds, multiplier_counts, rr_move_probabilities
from .base import AllocationProblem, Allocator, Needs, get_allocator, register, round_to_budget, solve_increasing

__all__ = ["OptunaSearch", "EvoSampler", "ANCHORS", "OPTIMIZERS", "GUIDANCE", "project_log_density"]

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


OPTIMIZERS = ("evo", "cmaes", "tpe-mix")
GUIDANCE = ("rr", "none")
_ALPHA_RANGE = 3.0   # |log-multiplier| bound of the CMA-ES space (a factor of 20 on a layer's magnitudes)
_SIGMA0 = 0.2        # CMA-ES initial step in alpha units: a layer's magnitudes scaled by ~e^0.2 = 1.2 moves its
                     # sparsity several points (Optuna's CMA-ES works on [0, 1]-scaled parameters: see sampler)
_MOVES = (1, 2, 3)   # block moves per child, and their probabilities: mostly small steps, as in EvoPress
_MOVE_P = (0.5, 0.3, 0.2)


def _param(name: str, prefix: str) -> str:
    return f"{prefix}:{name}"


def _check_study_matches(study, created: bool, meta: dict) -> None:
    """Record what a new study searches; refuse to add trials of another budget/optimizer/model to it.

    The default study name is keyed on these settings; an explicit ``--study-name`` reused elsewhere is not.
    ``settings`` (when the caller has it) is the hash of everything else that gives a trial's score its
    meaning (model weights, calibration and selection images, repair, objective, evo's moves and screen).
    """
    if created:
        for k, v in meta.items():
            study.set_user_attr(k, v)
        return
    stored = study.user_attrs
    for k, v in meta.items():
        if k in stored and stored[k] != v:
            if k == "settings":
                raise UserError(f"Optuna study {study.study_name} was made with other settings (model weights, "
                                "calibration or selection images, repair, objective or search options) than this run: "
                                "pass another --study-name, or none (the default name is keyed on the settings)")
            shown = "other layers" if k == "layers" else f"{k} {stored[k]!r}"
            raise UserError(f"Optuna study {study.study_name} searches {shown}, this run {k} "
                            f"{'(these layers)' if k == 'layers' else repr(v)}: pass another --study-name, or none "
                            "(the default name is keyed on the settings)")


class EvoSampler:
    """Optuna sampler of the evolutionary search: a child of the best COMPLETE trial (see the module doc).

    Written against Optuna's sampler interface (``infer_relative_search_space`` / ``sample_relative``), so it
    runs under ``study.optimize`` with any storage and any number of workers. The child's parent number and
    screen score are stored on the trial (``parent``, ``parent_screen``) for the objective to screen with.
    """

    def __init__(self, problem: AllocationProblem, anchor: np.ndarray, seed: int, step: float,
                 guided: bool) -> None:
        import optuna

        self.problem, self.anchor, self.step, self.guided = problem, np.asarray(anchor, np.int64), step, guided
        self.rng = np.random.default_rng(seed)
        self.parent_screen: dict[int, float] = {}
        kmin, kmax = count_bounds(problem)
        self.space = {_param(n, "k"): optuna.distributions.IntDistribution(int(lo), int(hi))
                      for n, lo, hi in zip(problem.names, kmin, kmax)}
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    # -- optuna.samplers.BaseSampler interface
    def infer_relative_search_space(self, study, trial) -> dict:
        return self.space

    def sample_relative(self, study, trial, search_space) -> dict:
        from optuna.trial import TrialState

        if "fixed_params" in trial.system_attrs:  # an enqueued plan (the anchor): scored as given
            return {}
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        parent = min(done, key=lambda t: t.value) if done else None
        k0 = self.anchor if parent is None else np.array([parent.params[p] for p in self.space], np.int64)
        seen = {tuple(t.params.get(p) for p in self.space) for t in trials}
        for attempt in range(40):  # a child already in the study teaches nothing: draw again, wider each time
            child = self.child(k0, extra_moves=attempt // 10)
            if tuple(int(v) for v in child) not in seen:
                break
        if parent is not None:
            study._storage.set_trial_user_attr(trial._trial_id, "parent", parent.number)
            if "screen" in parent.user_attrs:
                screen = parent.user_attrs["screen"]
                study._storage.set_trial_user_attr(trial._trial_id, "parent_screen", screen)
                # the running Trial's user_attrs are cached before this call: the objective (same process)
                # reads the parent's screen here
                self.parent_screen[trial._trial_id] = screen
        return {p: int(v) for p, v in zip(self.space, child)}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        pass

    def after_trial(self, study, trial, state, values) -> None:
        pass

    def reseed_rng(self) -> None:
        self.rng = np.random.default_rng()
        self._fallback.reseed_rng()

    def child(self, k: np.ndarray, extra_moves: int = 0) -> np.ndarray:
        """``k`` after 1-3 (+ ``extra_moves``) block moves, drawn by the RR profile (guided) or uniformly."""
        p_donor = p_recv = None
        if self.guided:
            p_donor, p_recv = rr_move_probabilities(self.problem, k)
        n_moves = int(self.rng.choice(_MOVES, p=_MOVE_P)) + extra_moves
        return block_moves(self.problem, k, self.step, n_moves, self.rng, p_donor, p_recv)


@register
class OptunaSearch(Allocator):
    name = "optuna"
    needs = Needs(weights=True, profile=True, evaluate=True)
    description = ("end-to-end search started at global magnitude (evo: block moves guided by RR; cmaes; "
                   "tpe-mix), scored on the selection split")

    def __init__(self, n_trials: int | None = None, timeout: float | None = None, storage: str | None = None,
                 study_name: str | None = None, optimizer: str | None = None) -> None:
        self.n_trials, self.timeout, self.storage, self.study_name = n_trials, timeout, storage, study_name
        self.optimizer = optimizer
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
        optimizer = self.optimizer or opts.get("optimizer") or "evo"
        if optimizer not in OPTIMIZERS:
            raise UserError(f"unknown --optimizer {optimizer!r}: use {', '.join(OPTIMIZERS)}")
        guidance = opts.get("guidance") or "rr"
        if guidance not in GUIDANCE:
            raise UserError(f"unknown --guidance {guidance!r}: use {' or '.join(GUIDANCE)}")
        settings = ost.StudySettings.from_options(
            {**opts, "n_trials": self.n_trials if self.n_trials is not None else int(opts.get("n_trials", 30)),
             "timeout": self.timeout if self.timeout is not None else opts.get("timeout")})
        storage = ost.open_storage(self.storage or opts.get("storage"), settings)
        name = self.study_name or opts.get("study_name") or "rr_alloc"
        space = {"evo": self._evo, "cmaes": self._cmaes, "tpe-mix": self._tpe_mix}[optimizer]
        make_sampler, enqueue, objective = space(problem, guidance == "rr", float(opts.get("search_step", 0.05)))
        optuna.logging.set_verbosity(logging.WARNING)
        study, created = ost.open_study(name, storage, make_sampler, problem.seed, enqueue,
                                        load_only=settings.n_trials == 0)
        meta = {"budget": float(problem.budget), "unit": problem.unit, "optimizer": optimizer,
                "layers": list(problem.names)}
        if opts.get("study_key"):
            meta["settings"] = opts["study_key"]
        _check_study_matches(study, created, meta)
        ost.optimize(study, objective, settings, callbacks=opts.get("callbacks"))
        self.study = study
        best = ost.best_trial(study)
        return np.asarray(best.user_attrs["counts"], float) / problem.n

    # ------------------------------------------------------------ optimisers
    @staticmethod
    def _record(trial, counts: np.ndarray) -> None:
        trial.set_user_attr("counts", [int(k) for k in counts])

    def _evo(self, problem: AllocationProblem, guided: bool, step: float):
        import optuna

        anchor = get_allocator("global").allocate(problem)
        names = [_param(n, "k") for n in problem.names]
        score = getattr(problem.evaluate, "score", None)
        kmin, kmax = count_bounds(problem)

        def objective(trial: "optuna.Trial") -> float:
            counts = np.array([trial.suggest_int(p, int(lo), int(hi)) for p, lo, hi in zip(names, kmin, kmax)])
            self._record(trial, counts)
            if score is None:  # a plain callable: no screening
                return float(problem.evaluate(counts))
            r = score(counts, beat=getattr(trial.study.sampler, "parent_screen", {}).pop(trial._trial_id, None))
            trial.set_user_attr("screen", r.screen)
            if r.full is None:
                raise optuna.TrialPruned(f"screen {r.screen:.4f} on {r.n_screen} images did not beat the parent")
            return r.full

        def enqueue(study: "optuna.Study") -> None:
            study.enqueue_trial({p: int(k) for p, k in zip(names, anchor)})

        return (lambda seed: EvoSampler(problem, anchor, seed, step, guided)), enqueue, objective

    def _cmaes(self, problem: AllocationProblem, guided: bool, step: float):
        import optuna

        sorted_abs = get_allocator("global").sorted_scores(problem)
        names = [_param(n, "a") for n in problem.names]

        def objective(trial: "optuna.Trial") -> float:
            alpha = np.array([trial.suggest_float(p, -_ALPHA_RANGE, _ALPHA_RANGE) for p in names])
            counts = multiplier_counts(problem, sorted_abs, alpha)
            self._record(trial, counts)
            return float(problem.evaluate(counts))

        def enqueue(study: "optuna.Study") -> None:
            study.enqueue_trial({p: 0.0 for p in names})

        def sampler(seed: int):
            # x0 and sigma0 are deprecated from Optuna 4.9 (to be removed in 6, which pyproject excludes), but the
            # search must start at the anchor with a step much smaller than the +-3 bounds: keep them, quietly
            # Optuna rescales every parameter to [0, 1] before CMA-ES sees it, and takes sigma0 in those units
            return ost.quiet(lambda: optuna.samplers.CmaEsSampler(
                x0={p: 0.0 for p in names}, sigma0=_SIGMA0 / (2 * _ALPHA_RANGE), seed=seed, n_startup_trials=1,
                warn_independent_sampling=False))

        return sampler, enqueue, objective

    def _tpe_mix(self, problem: AllocationProblem, guided: bool, step: float):
        import optuna

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
            self._record(trial, counts)
            return float(problem.evaluate(counts))

        def enqueue(study: "optuna.Study") -> None:  # warm start: every anchor plan, exactly
            for k in ANCHORS:
                params = {f"w_{j}": float(j == k) for j in ANCHORS}
                params.update({f"stage{j}": 0.0 for j in range(3)})
                study.enqueue_trial(params)

        def sampler(seed: int) -> "optuna.samplers.BaseSampler":
            # constant_liar: concurrent workers treat each other's running trials as bad, so they spread out
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(len(ANCHORS) + 2, 8),
                                              constant_liar=True)

        return sampler, enqueue, objective
