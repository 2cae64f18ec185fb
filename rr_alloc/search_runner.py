"""The end-to-end search as a run: its study on a storage, the progress bar, the validation check, provenance.

``SearchRunner.run`` builds the optimiser's space on the experiment's problem: under a reconstruction
repair with ``evo``, the search over ladder levels (``allocators.level_search.LevelSpace``, scored by
``stitched.StitchedScorer`` from the level database, or with ``--level-inputs off`` by
``stitched.SequentialLevelScorer`` through the full pipeline); otherwise
``allocators.search.OptunaSearch.space``, every candidate pruned and repaired in full. It opens (or joins)
the Optuna study, adds this worker's trials, and keeps the best plan only when it beats global magnitude on
the validation split (when there is one), both through the full pipeline. What it did is returned as a
``SearchProvenance``, which goes into the plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .allocators import OptunaSearch, round_to_budget
from .allocators.level_search import LevelSpace
from .allocators.search import SearchOptions, trial_counts
from .config import RunConfig, study_key_fields
from .evaluator import Evaluator
from .experiment import Experiment
from .level_db import level_index
from .optuna_storage import Heartbeat, open_storage
from .optuna_study import StudySettings, best_trial, check_study_matches, evaluated, open_study, optimize
from .selection import SelectionScorer, paired_upper_bound
from .stitched import LevelScorer, SequentialLevelScorer, StitchedScorer

__all__ = ["SearchRunner", "SearchProvenance", "study_key"]


@dataclass
class SearchProvenance:
    """What a search did and what the validation check decided (the plan's ``search`` block)."""

    optimizer: str
    guidance: str | None
    objective: str
    repair: str
    trials: int  # evaluated trials: completed, or screened out by evo
    complete: int
    pruned: int  # screened out (trials stopped by --total-trials not counted)
    screen_size: int | None
    study_name: str | None
    best_selection: float | None
    global_selection: float
    selection_size: int
    seconds: float
    validation_size: int = 0
    validation: float | None = None
    global_validation: float | None = None
    validation_diff: float | None = None
    validation_bound: float | None = None
    fallback: bool | None = None
    stages: list[int] | None = None  # level search: images of each screening stage
    level_inputs: str | None = None  # level search: the database's input rule, or off (the full pipeline)
    database: dict[str, Any] | None = None  # level search: the level database's provenance
    note: str | None = None

    _OPTIONAL = (
        *("validation", "global_validation", "validation_diff", "validation_bound"),
        *("stages", "level_inputs", "database", "note"),
    )

    def to_dict(self) -> dict[str, Any]:
        """The plan's ``search`` block (keys of checks that did not run are left out)."""
        d = asdict(self)
        fallback = d.pop("fallback")
        out = {k: v for k, v in d.items() if not (k in self._OPTIONAL and v is None)}
        out["fallback"] = fallback
        if "note" in out:  # after the decision it explains
            out["note"] = out.pop("note")
        return out


def study_key(experiment: Experiment, budget: float) -> str:
    """A hash of everything that decides what a trial's score means (the default study name's suffix).

    Keyed on content (model weights, calibration and selection images, settings), never on paths: workers
    whose data sit under other mount points share the study; any change starts a new one.
    """
    cfg = experiment.cfg
    parts = {
        "model": experiment.model_fingerprint,
        "calib": experiment.data_fingerprints["calib"],
        "selection": experiment.data_fingerprints["selection"],
        "budget": float(budget),
        "repair": cfg.loop_repair,
        "layers": [layer.name for layer in experiment.layers],
        **study_key_fields(cfg),
        # --level-inputs off once moved by fractions: its level-move studies get a key of their own
        **({"moves": "levels"} if experiment.level_rule() == "off" else {}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class SearchRunner:
    """Runs the configured search at a budget on one experiment (and keeps the last study for reports)."""

    def __init__(self, experiment: Experiment, evaluator: Evaluator, progress: bool = True) -> None:
        self.experiment, self.evaluator, self.progress = experiment, evaluator, progress
        self.provenance: dict[float, SearchProvenance] = {}
        self.last_study: Any = None
        self.database: Any = None  # the level database of the last search (None: candidates reconstructed)

    def run(self, budget: float, global_counts: dict[str, int]) -> dict[str, int]:
        """The searched plan's per-layer counts (global magnitude's when the validation check rejects it)."""
        exp, cfg = self.experiment, self.experiment.cfg
        t0 = time.perf_counter()
        rule = exp.level_rule() if cfg.optimizer == "evo" else None
        if rule is None:
            scorer = self.evaluator.scorer(cfg.loop_repair, cfg.objective, cfg.screen_size)
            problem = exp.problem(budget, OptunaSearch.needs, evaluate=scorer)
            space = OptunaSearch(SearchOptions(cfg.optimizer, cfg.guidance, cfg.search_step)).space(problem)
            self.database = None
        else:
            if rule == "off":  # the level search, every candidate through the full sequential pipeline
                self.database = None
                ladders = exp.level_ladders(global_counts)
                scorer = SequentialLevelScorer(self.evaluator, cfg.loop_repair, ladders, cfg.objective, cfg.stages)
            else:
                self.database = db = exp.level_database(global_counts, rule)
                scorer = StitchedScorer(self.evaluator, cfg.loop_repair, db, cfg.objective, cfg.stages)
            problem = exp.problem(budget, OptunaSearch.needs, evaluate=scorer)
            ladders = [scorer.ladders[n] for n in problem.names]
            anchor = np.array([level_index(lad, global_counts[n], n) for lad, n in zip(ladders, problem.names)])
            space = LevelSpace(problem, ladders, anchor, cfg.guidance == "rr")
        study = self._optimize(budget, problem, space)
        best = best_trial(study)
        k = round_to_budget(problem, np.asarray(trial_counts(best), float) / problem.n)
        counts = {layer.name: int(v) for layer, v in zip(exp.layers, k)}
        return self.validate(counts, global_counts, budget, study, scorer, time.perf_counter() - t0)

    def _optimize(self, budget: float, problem: Any, space: Any) -> Any:
        """Add this worker's trials of ``space`` (its sampler, warm start and objective) to the study."""
        import optuna

        cfg = self.experiment.cfg
        settings = StudySettings(cfg.n_trials, cfg.timeout, cfg.total_trials)
        storage = open_storage(cfg.storage, heartbeat(cfg))
        key = study_key(self.experiment, budget)
        name = cfg.study_name or f"rr_alloc-{key}"
        optuna.logging.set_verbosity(logging.WARNING)
        study, created = open_study(
            name, storage, space.sampler, problem.seed, space.enqueue, load_only=settings.n_trials == 0
        )
        check_study_matches(
            study,
            created,
            {
                "budget": float(budget),
                "unit": problem.unit,
                "optimizer": cfg.optimizer,
                "layers": list(problem.names),
                "settings": key,
            },
        )
        bar, callbacks = self._progress_bar(cfg)
        try:
            optimize(study, space.objective, settings, callbacks=callbacks)
        finally:
            if bar is not None:
                bar.close()
        self.last_study = study
        return study

    def _progress_bar(self, cfg: RunConfig) -> tuple[Any, list]:
        """A progress bar of the search (trials, best score so far), as an Optuna callback."""
        if not self.progress:
            return None, []
        from optuna.trial import TrialState

        from .progress import bar as progress_bar

        bar = progress_bar(total=cfg.n_trials or None, desc="search", unit="trial")

        def update(study: Any, trial: Any) -> None:
            bar.update(1)
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if done:
                bar.set_postfix_str(f"best {cfg.objective} {min(t.value for t in done):.4f}")

        return bar, [update]

    def validate(
        self,
        counts: dict[str, int],
        glob: dict[str, int],
        budget: float,
        study: Any,
        scorer: SelectionScorer,
        seconds: float,
    ) -> dict[str, int]:
        """Keep a searched plan only when it beats global magnitude ``glob`` on the validation split.

        The paired per-image loss difference (search - global) must have a one-sided 95% upper bound below 0;
        otherwise global magnitude is returned. Without a validation split the plan is kept, unchecked.
        The provenance goes to ``provenance[budget]``.
        """
        from optuna.trial import TrialState

        cfg, splits = self.experiment.cfg, self.experiment.splits
        trials = [t for t in study.get_trials(deepcopy=False) if evaluated(t)] if study is not None else []
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        anchor = next((t for t in done if trial_counts(t) == [glob[n] for n in scorer.names]), None)
        best = min(done, key=lambda t: t.value) if done else None
        evo = cfg.optimizer == "evo"
        prov = SearchProvenance(
            optimizer=cfg.optimizer,
            guidance=cfg.guidance if evo else None,
            objective=cfg.objective,
            repair=cfg.loop_repair,
            trials=len(trials),
            complete=len(done),
            pruned=len(trials) - len(done),
            screen_size=scorer.screen_size if evo else None,
            study_name=study.study_name if study is not None else None,
            best_selection=best.value if best else None,
            global_selection=anchor.value if anchor else scorer(glob),
            selection_size=splits.selection.n,
            seconds=round(seconds, 1),
        )
        if isinstance(scorer, LevelScorer):
            prov.stages, prov.level_inputs = list(scorer.sizes), self.experiment.level_rule()
        if isinstance(scorer, StitchedScorer):
            prov.database = dict(scorer.db.meta)
        val = splits.validation
        if val is None or val.n == 0:
            prov.validation_size = 0
        elif counts == glob:
            prov.validation_size, prov.fallback = val.n, False
            prov.note = "the search's best plan is global magnitude"
        else:
            mine = scorer.losses(scorer.model(counts), "validation")
            ref = scorer.losses(scorer.model(glob), "validation")
            bound = paired_upper_bound(mine - ref)
            prov.validation_size, prov.validation = val.n, float(mine.mean())
            prov.global_validation, prov.validation_diff = float(ref.mean()), float((mine - ref).mean())
            prov.validation_bound, prov.fallback = bound, not bound < 0
            if prov.fallback:
                counts = dict(glob)
        self.provenance[float(budget)] = prov
        return counts


def heartbeat(cfg: RunConfig) -> Heartbeat:
    """The run's heartbeat settings (checked: the grace period must exceed the interval)."""
    return Heartbeat(cfg.heartbeat_interval, cfg.grace_period, cfg.max_retry)
