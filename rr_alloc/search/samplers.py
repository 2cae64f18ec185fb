"""Optuna samplers of the search, on Optuna's public sampler interface (``optuna.samplers.BaseSampler``).

- ``EvoSampler``: a child of the study's best COMPLETE trial after a few block moves. The parent's trial
  number is one of the child's parameters (``PARENT``), so the objective finds the parent (and its screen)
  through the study, a retried trial keeps its parent, and another worker or a resumed run continues from
  the stored best.
- ``CmaSampler``: CMA-ES (the ``cmaes`` package) over per-layer log-multipliers, started at ``x0`` with
  the step ``sigma0`` in the parameters' own units. Its state is rebuilt from the study's completed trials
  (generations of ``popsize`` in trial order), so it resumes and works beside other workers.

Trials enqueued with the ``ANCHOR`` user attribute (the warm start) and retried trials (their parameters
already set) are scored as given: neither sampler draws anything for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

__all__ = ["EvoSampler", "CmaSampler", "PARENT", "PARENT_DISTRIBUTION", "ANCHOR", "scored_as_given"]

PARENT = "evo:parent"  # parameter: the trial number of a child's parent (-1: no parent)
PARENT_DISTRIBUTION = IntDistribution(-1, 2**31 - 1)
ANCHOR = "anchor"  # user attribute of an enqueued warm-start trial: which plan it is
_REDRAWS = 40  # a child already in the study teaches nothing: draw again, wider every 10 tries


def scored_as_given(trial: FrozenTrial) -> bool:
    """An enqueued warm-start trial or a retried one: its parameters are fixed, nothing is sampled."""
    return ANCHOR in trial.user_attrs or bool(trial.params)


class EvoSampler(optuna.samplers.BaseSampler):
    """(1 + 1) evolutionary sampler over per-layer pruned counts (``k:<layer>`` integer parameters).

    ``child(k, rng, extra_moves)`` returns the mutated counts (block moves: the budget stays exact).
    """

    def __init__(
        self,
        space: dict[str, IntDistribution],
        anchor: np.ndarray,
        child: Callable[[np.ndarray, np.random.Generator, int], np.ndarray],
        seed: int | None,
    ) -> None:
        self.space = dict(space)
        self.anchor = np.asarray(anchor, np.int64)
        self._child = child
        self.rng = np.random.default_rng(seed)
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {PARENT: PARENT_DISTRIBUTION, **self.space}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if scored_as_given(trial):
            return {}
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        parent = min(done, key=lambda t: t.value) if done else None
        k0 = self.anchor if parent is None else np.array([parent.params[p] for p in self.space], np.int64)
        seen = {tuple(t.params.get(p) for p in self.space) for t in trials}
        for attempt in range(_REDRAWS):
            child = self._child(k0, self.rng, attempt // 10)
            if tuple(int(v) for v in child) not in seen:
                break
        return {PARENT: -1 if parent is None else parent.number, **{p: int(v) for p, v in zip(self.space, child)}}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if param_name == PARENT:  # a trial scored as given that lacks the parameter: it has no known parent
            return -1
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        self.rng = np.random.default_rng()
        self._fallback.reseed_rng()


class CmaSampler(optuna.samplers.BaseSampler):
    """CMA-ES over float parameters ``names`` within ``bounds``, from ``x0`` with step ``sigma0`` (same units)."""

    def __init__(
        self, names: Sequence[str], x0: np.ndarray, sigma0: float, bounds: tuple[float, float], seed: int | None
    ) -> None:
        self.names = list(names)
        self.x0, self.sigma0, self.bounds, self.seed = np.asarray(x0, float), float(sigma0), bounds, seed
        self._cma: Any = None
        self.told: set[int] = set()  # numbers of the completed children already told to the optimiser
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {n: FloatDistribution(*self.bounds) for n in self.names}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if scored_as_given(trial):
            return {}
        x = self.optimizer(study).ask()
        return {n: float(v) for n, v in zip(self.names, x)}

    def optimizer(self, study: optuna.Study) -> Any:
        """The CMA-ES state after every full generation of completed children.

        A generation is the next ``popsize`` completed children in trial-number order, told only once no
        lower-numbered trial is still running or waiting: every worker (and a resumed run) tells the same
        trials in the same order, however the trials finished.
        """
        import cmaes

        if self._cma is None:
            bounds = np.tile(np.asarray(self.bounds, float), (len(self.names), 1))
            self._cma = cmaes.CMA(mean=self.x0.copy(), sigma=self.sigma0, bounds=bounds, seed=self.seed)
        trials = study.get_trials(deepcopy=False)
        unfinished = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        first_open = min(unfinished, default=None)
        fresh = [
            t
            for t in trials
            if t.state == TrialState.COMPLETE and ANCHOR not in t.user_attrs and t.number not in self.told
        ]
        pop = self._cma.population_size
        while len(fresh) >= pop and (first_open is None or fresh[pop - 1].number < first_open):
            batch, fresh = fresh[:pop], fresh[pop:]
            self._cma.tell([(np.array([t.params[n] for n in self.names]), float(t.value)) for t in batch])
            self.told.update(t.number for t in batch)
        return self._cma

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        self._fallback.reseed_rng()
