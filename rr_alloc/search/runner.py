"""The end-to-end search as a run: its study on a storage, the progress bar, the validation check, provenance.

``run_search`` builds the optimiser's space on the session's problem: under a reconstruction
repair with ``evo``, the search over ladder levels (``level_space.LevelSpace``, scored by
``stitched.StitchedScorer`` from the level database, or with ``--level-inputs off`` by
``stitched.SequentialLevelScorer`` through the full pipeline); otherwise
``optimizers.OptunaSearch.space``, every candidate pruned and repaired in full. It opens (or joins)
the Optuna study, adds this worker's trials, and keeps the best plan only when it beats the anchor plan
(global magnitude) on the validation split (when there is one), both through the full pipeline. What it did
is returned with the counts as a ``SearchResult``; its ``SearchProvenance`` goes into the plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .. import evidence
from ..allocators import round_to_budget
from ..session import Session
from .databases import level_database, level_ladders
from .level_db import LevelDatabase, level_index
from .level_space import LevelSpace, level_rule
from .optimizers import OptunaSearch, SearchOptions, trial_counts
from .scoring import SelectionScorer, paired_upper_bound
from .stitched import LevelScorer, SequentialLevelScorer, StitchedScorer
from .storage import Heartbeat, open_storage
from .study import StudySettings, best_trial, check_study_matches, evaluated, open_study, optimize

__all__ = ["run_search", "SearchResult", "SearchProvenance", "study_key", "heartbeat"]


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
    anchor: str  # the best rule on the selection split: where the search starts, what validation compares with
    anchor_selection: float
    selection_size: int
    seconds: float
    global_selection: float | None = None  # global magnitude's score (the rule most tools use), beside the anchor's
    rule_scores: dict[str, float] | None = None  # every anchor rule's selection score
    validation_size: int = 0
    validation: float | None = None
    anchor_validation: float | None = None
    validation_diff: float | None = None
    validation_bound: float | None = None
    fallback: bool | None = None
    stages: list[int] | None = None  # level search: images of each screening stage
    level_inputs: str | None = None  # level search: the database's input rule, or off (the full pipeline)
    database: dict[str, Any] | None = None  # level search: the level database's provenance
    note: str | None = None

    _OPTIONAL = (
        *("validation", "anchor_validation", "validation_diff", "validation_bound", "rule_scores"),
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


def study_key(session: Session, budget: float) -> str:
    """A hash of everything that decides what a trial's score means (the default study name's suffix).

    Keyed on content (model weights, calibration and selection images, settings), never on paths: workers
    whose data sit under other mount points share the study; any change starts a new one.
    """
    cfg = session.cfg
    parts = {
        "model": session.model_fingerprint,
        "calib": session.data_fingerprints["calib"],
        "selection": session.data_fingerprints["selection"],
        "budget": float(budget),
        "repair": cfg.loop_repair,
        "layers": [layer.name for layer in session.layers],
        **cfg.study_key_fields(),
        # --level-inputs off once moved by fractions: its level-move studies get a key of their own
        **({"moves": "levels"} if level_rule(cfg.level_inputs, cfg.loop_repair) == "off" else {}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SearchResult:
    """A finished search: the plan's counts (the anchor's when the validation check rejects the search's best),
    what the search did (the plan's ``search`` block), its Optuna study and its level database (if any)."""

    counts: dict[str, int]
    provenance: SearchProvenance
    study: Any
    database: LevelDatabase | None = None


def run_search(session: Session, budget: float, start: Any) -> SearchResult:
    """Search the session's configured space at ``budget`` from the anchor rule ``start`` (its ``rule``,
    ``counts`` and every rule's ``scores``, ``api.AnchorChoice``), and validate against that rule."""
    cfg, anchor = session.cfg, start.counts
    t0 = time.perf_counter()
    rule = level_rule(cfg.level_inputs, cfg.loop_repair) if cfg.optimizer == "evo" else None
    db = None
    if rule is None:
        scorer = SelectionScorer(session, cfg.loop_repair, cfg.objective, cfg.screen_size)
        problem = evidence.problem(session, budget, OptunaSearch.needs, evaluate=scorer)
        options = SearchOptions(cfg.optimizer, cfg.guidance, cfg.search_step, start.rule, _in_order(problem, anchor))
        space = OptunaSearch(options).space(problem)
    else:
        if rule == "off":  # the level search, every candidate through the full sequential pipeline
            ladders = level_ladders(session, anchor)
            scorer = SequentialLevelScorer(session, cfg.loop_repair, ladders, cfg.objective, cfg.stages)
        else:
            db = level_database(session, anchor, rule)
            scorer = StitchedScorer(session, cfg.loop_repair, db, cfg.objective, cfg.stages)
        problem = evidence.problem(session, budget, OptunaSearch.needs, evaluate=scorer)
        ladders = [scorer.ladders[n] for n in problem.names]
        at = np.array([level_index(lad, anchor[n], n) for lad, n in zip(ladders, problem.names)])
        space = LevelSpace(problem, ladders, at, cfg.guidance == "rr")
    study = _optimize(session, budget, problem, space)
    best = best_trial(study)
    k = round_to_budget(problem, np.asarray(trial_counts(best), float) / problem.n)
    counts = {layer.name: int(v) for layer, v in zip(session.layers, k)}
    counts, prov = validate(session, counts, anchor, study, scorer, time.perf_counter() - t0, start)
    return SearchResult(counts, prov, study, db)


def _in_order(problem: Any, counts: dict[str, int]) -> tuple[int, ...]:
    return tuple(int(counts[n]) for n in problem.names)


def _optimize(session: Session, budget: float, problem: Any, space: Any) -> Any:
    """Add this worker's trials of ``space`` (its sampler, warm start and objective) to the study."""
    import optuna

    cfg = session.cfg
    settings = StudySettings(cfg.n_trials, cfg.timeout, cfg.total_trials)
    storage = open_storage(cfg.storage, heartbeat(cfg))
    key = study_key(session, budget)
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
    bar, callbacks = _progress_bar(cfg) if session.progress else (None, [])
    try:
        optimize(study, space.objective, settings, callbacks=callbacks)
    finally:
        if bar is not None:
            bar.close()
    return study


def _progress_bar(cfg: Any) -> tuple[Any, list]:
    """A progress bar of the search (trials, best score so far), as an Optuna callback."""
    from optuna.trial import TrialState

    from ..system.progress import bar as progress_bar

    bar = progress_bar(total=cfg.n_trials or None, desc="search", unit="trial")

    def update(study: Any, trial: Any) -> None:
        bar.update(1)
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if done:
            bar.set_postfix_str(f"best {cfg.objective} {min(t.value for t in done):.4f}")

    return bar, [update]


def validate(
    session: Session,
    counts: dict[str, int],
    anchor: dict[str, int],
    study: Any,
    scorer: SelectionScorer,
    seconds: float,
    start: Any = None,
) -> tuple[dict[str, int], SearchProvenance]:
    """Keep a searched plan only when it beats the ``anchor`` plan (the best rule) on the validation split.

    The paired per-image loss difference (search - anchor) must have a one-sided 95% upper bound below 0;
    otherwise the anchor's counts are returned. Without a validation split the plan is kept, unchecked.
    """
    prov = _provenance(session, anchor, study, scorer, seconds, start)
    val = session.splits.validation
    if val is None or val.n == 0:
        prov.validation_size = 0
    elif counts == anchor:
        prov.validation_size, prov.fallback = val.n, False
        prov.note = f"the search's best plan is the anchor rule's ({prov.anchor})"
    else:
        mine = scorer.losses(scorer.model(counts), "validation")
        ref = scorer.losses(scorer.model(anchor), "validation")
        bound = paired_upper_bound(mine - ref)
        prov.validation_size, prov.validation = val.n, float(mine.mean())
        prov.anchor_validation, prov.validation_diff = float(ref.mean()), float((mine - ref).mean())
        prov.validation_bound, prov.fallback = bound, not bound < 0
        if prov.fallback:
            counts = dict(anchor)
    return counts, prov


def _provenance(
    session: Session, anchor: dict[str, int], study: Any, scorer: SelectionScorer, seconds: float, start: Any = None
) -> SearchProvenance:
    """What the search did, before the validation check."""
    from optuna.trial import TrialState

    cfg = session.cfg
    trials = [t for t in study.get_trials(deepcopy=False) if evaluated(t)] if study is not None else []
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    first = next((t for t in done if trial_counts(t) == [anchor[n] for n in scorer.names]), None)
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
        anchor=start.rule if start is not None else "global",
        anchor_selection=first.value if first else scorer(anchor),
        selection_size=session.splits.selection.n,
        seconds=round(seconds, 1),
        rule_scores=dict(start.scores) if start is not None else None,
    )
    prov.global_selection = prov.rule_scores.get("global") if prov.rule_scores else prov.anchor_selection
    if isinstance(scorer, LevelScorer):
        prov.stages, prov.level_inputs = list(scorer.sizes), level_rule(cfg.level_inputs, cfg.loop_repair)
    if isinstance(scorer, StitchedScorer):
        prov.database = dict(scorer.db.meta)
    return prov


def heartbeat(cfg: Any) -> Heartbeat:
    """The run's heartbeat settings (checked: the grace period must exceed the interval)."""
    return Heartbeat(cfg.heartbeat_interval, cfg.grace_period, cfg.max_retry)
