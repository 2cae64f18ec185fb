"""Optuna studies on a shared storage: create-or-join, multi-worker optimisation, trial accounting.

- ``open_study``: create-or-load; only the process whose ``create_study`` succeeded enqueues the warm-start
  trials, so they are enqueued exactly once. Each worker samples its own stream: the creator uses the run's
  seed (a single worker on a fresh study is reproducible), every joining or resuming worker a fresh one,
  and TPE's ``constant_liar`` keeps concurrent workers away from each other's running trials.
- ``optimize``: ``n_trials`` is what this process adds; ``total_trials`` stops every worker once the study
  holds that many evaluated trials (completed, or screened out by the evolutionary search), exactly: a
  trial that would exceed it is pruned before it samples anything.
- ``check_study_matches``: a study records what it searches; trials of another search are refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .storage import describe_storage, first_line, heartbeats_on, open_storage, quiet, retry_locked

__all__ = [
    "StudySettings",
    "open_study",
    "optimize",
    "evaluated",
    "n_evaluated",
    "best_trial",
    "worker_id",
    "worker_seed",
    "summary_lines",
    "check_study_matches",
]


def worker_id() -> str:
    """``host:pid``, stored on each trial so the dashboard shows who ran it."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class StudySettings:
    """How many trials this process adds (``n_trials``, ``timeout``) and when every worker stops."""

    n_trials: int = 30
    timeout: float | None = None
    total_trials: int | None = None

    def __post_init__(self) -> None:
        if self.n_trials < 0:
            raise UserError(
                f"--n-trials must be >= 0, got {self.n_trials}: pass 0 to write the plan from the best trial"
            )
        if self.total_trials is not None and self.total_trials < 1:
            raise UserError(f"--total-trials must be >= 1, got {self.total_trials}")


def check_study_matches(study: Any, created: bool, meta: dict[str, Any]) -> None:
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
                raise UserError(
                    f"Optuna study {study.study_name} was made with other settings (model weights, "
                    "calibration or selection images, repair, objective or search options) than this run: "
                    "pass another --study-name, or none (the default name is keyed on the settings)"
                )
            shown = "other layers" if k == "layers" else f"{k} {stored[k]!r}"
            raise UserError(
                f"Optuna study {study.study_name} searches {shown}, this run {k} "
                f"{'(these layers)' if k == 'layers' else repr(v)}: pass another --study-name, or none "
                "(the default name is keyed on the settings)"
            )


def worker_seed(base_seed: int, created: bool) -> int:
    """The creator keeps the run's seed; joiners and resumers draw their own, so no two workers share a stream."""
    if created:
        return int(base_seed)
    return (int(base_seed) * 1_000_003 + secrets.randbits(32)) % 2**32


def open_study(
    name: str,
    storage: Any,
    make_sampler: Callable[[int], Any],
    base_seed: int,
    enqueue: Callable[[Any], None],
    load_only: bool = False,
    log: Callable[[str], None] | None = None,
):
    """Create the study or join it. Only the creator runs ``enqueue`` (the warm-start trials).

    Returns ``(study, created)``. ``load_only`` (``--n-trials 0``) never creates: a missing study is an error.
    """
    import optuna

    log = log or (lambda s: print(s, flush=True))
    created = False

    def create_or_load() -> Any:
        nonlocal created
        if load_only:
            return optuna.load_study(study_name=name, storage=storage)
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
            created = True
            return study
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(study_name=name, storage=storage)

    try:
        study = retry_locked(create_or_load)
    except KeyError:  # load_study of a missing study
        raise UserError(
            f"no Optuna study {name} in the storage: run a worker with --n-trials > 0 first "
            "(or pass the --study-name it printed)"
        ) from None
    seed = worker_seed(base_seed, created)
    study.sampler = make_sampler(seed)
    if created:
        enqueue(study)
    n = len(study.get_trials(deepcopy=False))
    hb = "heartbeat on" if heartbeats_on(storage) else "no heartbeat (a killed worker's trial stays RUNNING)"
    log(
        f"optuna study {name}: {'created, warm-start trials enqueued' if created else f'joined ({n} trials)'}; "
        f"worker {worker_id()} seed {seed}; {hb}"
    )
    return study, created


def evaluated(trial: Any) -> bool:
    """A trial that scored a candidate: COMPLETE, or PRUNED by the search's screen (it carries ``screen``).

    Trials a worker pruned because the study was full carry no score and do not count (marked ``surplus``:
    a retried trial inherits the killed attempt's ``screen``, so the screen alone does not tell).
    """
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    screened_out = trial.state == TrialState.PRUNED and "screen" in attrs and not attrs.get("surplus")
    return trial.state == TrialState.COMPLETE or screened_out


def n_evaluated(study: Any) -> int:
    from optuna.trial import TrialState

    return sum(evaluated(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _surplus(study: Any, number: int, total: int) -> bool:
    """Would trial ``number`` take the study past ``total`` evaluated trials?

    Counts evaluated trials and the running trials started before this one (lower number), so of two
    workers racing for the last slot exactly one goes ahead.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    ahead = sum(evaluated(t) or (t.state == TrialState.RUNNING and t.number < number) for t in trials)
    return ahead >= total


def optimize(
    study: Any,
    objective: Callable[[Any], float],
    settings: StudySettings,
    callbacks: list[Callable[[Any, Any], None]] | None = None,
) -> None:
    """Add up to ``n_trials`` trials from this process; stop at ``total_trials`` evaluated in the study
    (completed, or screened out by the evolutionary search: each scored a candidate).

    ``callbacks``: Optuna trial callbacks ``(study, frozen_trial)``, e.g. a progress bar.
    """
    import optuna

    total = settings.total_trials
    if settings.n_trials == 0:
        return
    if total is not None and n_evaluated(study) >= total:
        return
    wid = worker_id()

    def run(trial: "optuna.Trial") -> float:
        trial.set_user_attr("worker", wid)
        if total is not None and _surplus(study, trial.number, total):
            study.stop()  # every slot is taken: leave without sampling (the trial ends PRUNED, no parameters)
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned(f"the study holds --total-trials {total}")
        return objective(trial)

    def stop_when_full(study: Any, trial: Any) -> None:
        if n_evaluated(study) >= total:
            study.stop()

    stops = [stop_when_full] if total else []
    with _no_failed_trial_logs():
        quiet(
            lambda: study.optimize(
                run,
                n_trials=settings.n_trials,
                timeout=settings.timeout,
                callbacks=stops + list(callbacks or []),
                gc_after_trial=False,
            )
        )


class _DropRaisedTrialErrors(logging.Filter):
    """Optuna logs a trial's exception with its traceback, then re-raises it: the CLI reports it in one
    line (``error: interrupted``, a ``UserError``), and a genuine bug still gets Python's traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.exc_info and msg.startswith("Trial ") and " failed " in msg:
            return False
        return not (msg.startswith("Trial ") and msg.endswith(" failed with value None."))


@contextlib.contextmanager
def _no_failed_trial_logs() -> Iterator[None]:
    handlers = logging.getLogger("optuna").handlers + logging.getLogger().handlers
    f = _DropRaisedTrialErrors()
    for h in handlers:
        h.addFilter(f)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(f)


def best_trial(study: Any) -> Any:
    """The best completed trial, or a one-line error when the study has none yet."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UserError(
            f"Optuna study {study.study_name} has no completed trial yet: run a worker with "
            "--n-trials > 0 (or wait for the running ones)"
        )
    return study.best_trial


def summary_lines(storage: str, objective: str) -> list[str]:
    """One line per study in ``storage``: completed trials and best value."""
    import optuna
    from optuna.trial import TrialState

    st = open_storage(storage)
    out = []
    view = describe_storage(storage)  # never print a password
    for summary in optuna.get_all_study_summaries(st, include_best_trial=False):
        # a shared storage holds other studies too: empty, failed-only, multi-objective, running
        name = summary.study_name
        try:
            study = optuna.load_study(study_name=name, storage=st)
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            values = [t.values[0] for t in done if t.values and len(t.values) == 1]
            best = f"{min(values):.4f}" if values else "-"
        except Exception as e:  # a line of the summary never fails a run whose outputs are written
            out.append(f"optuna study {name}: cannot be summarised ({first_line(e)})")
            continue
        out.append(
            f"optuna study {name}: {len(done)} completed trials, best {objective} on selection "
            f"{best}; view: optuna-dashboard {view}"
        )
    return out
