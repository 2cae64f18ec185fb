"""Optuna studies shared by several workers (processes or machines) on one storage.

Everything the Optuna allocator needs to run safely next to other workers:

- ``check_storage`` / ``open_storage``: a storage URL (``sqlite:///...``, ``postgresql+psycopg://...``, any
  SQLAlchemy URL, or a journal file ``*.log``) is checked before any work: a missing driver or an
  unreachable server is one ``UserError`` line. Creating the schema of a fresh database races between
  workers (both see no tables, one fails), so it runs under a PostgreSQL advisory lock and is retried
  with jittered backoff on every backend.
- Heartbeats (RDB storages only): a worker killed mid-trial stops beating; after the grace period the
  next trial of any worker marks it failed and ``RetryHeartbeatStaleTrialCallback`` re-enqueues it with
  the same parameters (at most ``max_retry`` times).
- ``open_study``: create-or-load; only the process whose ``create_study`` succeeded enqueues the warm-start
  trials, so they are enqueued exactly once. Each worker samples its own stream: the creator uses the run's
  seed (a single worker on a fresh study is reproducible), every joining or resuming worker a fresh one,
  and TPE's ``constant_liar`` keeps concurrent workers away from each other's running trials.
- ``optimize``: ``n_trials`` is what this process adds; ``total_trials`` stops every worker once the study
  holds that many evaluated trials (completed, or screened out by the evolutionary search), exactly: a
  trial that would exceed it is pruned before it samples anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import secrets
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from .cache import fingerprint_model, fingerprint_tensor
from .errors import UserError

__all__ = ["StudySettings", "check_storage", "open_storage", "open_study", "optimize", "study_name_for_workbench",
           "worker_id", "summary_lines", "JOURNAL_SUFFIXES", "quiet", "best_trial"]

JOURNAL_SUFFIXES = (".log", ".journal")
_SCHEMA_TRIES = 8          # fresh-database races resolve in one or two retries; 8 covers many workers
_CONNECT_TIMEOUT_S = 5     # an unreachable server fails fast instead of hanging the worker
_SQLITE_BUSY_S = 60        # workers and heartbeat threads share one SQLite file: wait for its lock
_LOCK_KEY = 0x72725F616C6C6F63  # PostgreSQL advisory-lock key of the schema set-up ("rr_alloc")
_LOCK_WAIT_S = 60


def worker_id() -> str:
    """``host:pid``, stored on each trial so the dashboard shows who ran it."""
    return f"{socket.gethostname()}:{os.getpid()}"


class StudySettings:
    """The multi-worker knobs of an Optuna run (from ``RunConfig``)."""

    def __init__(self, n_trials: int = 30, timeout: float | None = None, total_trials: int | None = None,
                 heartbeat_interval: int = 60, grace_period: int | None = None, max_retry: int = 2) -> None:
        if n_trials < 0:
            raise UserError(f"--n-trials must be >= 0, got {n_trials}: pass 0 to write the plan from the best trial")
        if total_trials is not None and total_trials < 1:
            raise UserError(f"--total-trials must be >= 1, got {total_trials}")
        if heartbeat_interval < 1:
            raise UserError(f"--heartbeat-interval must be a whole number of seconds >= 1, got {heartbeat_interval}")
        if grace_period is not None and grace_period <= heartbeat_interval:
            raise UserError(f"--grace-period ({grace_period} s) must exceed --heartbeat-interval "
                            f"({heartbeat_interval} s), or a live worker's trial is failed")
        if max_retry < 0:
            raise UserError(f"--max-retry must be >= 0, got {max_retry}")
        self.n_trials, self.timeout, self.total_trials = n_trials, timeout, total_trials
        self.heartbeat_interval, self.grace_period, self.max_retry = heartbeat_interval, grace_period, max_retry

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> "StudySettings":
        keys = ("n_trials", "timeout", "total_trials", "heartbeat_interval", "grace_period", "max_retry")
        return cls(**{k: opts[k] for k in keys if opts.get(k) is not None})


# ------------------------------------------------------------------ storage
def _journal_path(url: str) -> Path | None:
    """A journal file's path, or None for a database URL; anything else is a one-line error."""
    if "://" in url:
        return None
    if url.endswith(JOURNAL_SUFFIXES):
        return Path(url)
    raise UserError(f"--storage {url!r} is neither a database URL (sqlite:///FILE, postgresql+psycopg://...) "
                    f"nor a journal file ({' or '.join(JOURNAL_SUFFIXES)})")


def _sa_url(url: str):
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url)
    except Exception as e:  # sqlalchemy.exc.ArgumentError and friends
        raise UserError(f"--storage {url!r} is not a valid database URL ({_first_line(e)}): "
                        "use e.g. sqlite:///runs/optuna.db or postgresql+psycopg://USER@HOST/DB")


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _engine_kwargs(url) -> dict[str, Any]:
    if url.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": _SQLITE_BUSY_S}}
    if url.get_backend_name() == "postgresql":
        return {"connect_args": {"connect_timeout": _CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    return {}


def _check_driver(url) -> None:
    """Import the URL's DB-API driver; a missing one names the extra that installs it."""
    try:
        url.get_dialect().import_dbapi()
    except ImportError as e:
        hint = ('pip install -e ".[postgres]" (psycopg 3 and SQLAlchemy 2) and use postgresql+psycopg://'
                if url.get_backend_name() == "postgresql" else "install the driver for this database")
        raise UserError(f"--storage {url.drivername}:// needs a database driver that is not installed "
                        f"({_first_line(e)}): {hint}")
    except Exception as e:  # unknown dialect name
        raise UserError(f"--storage {url.render_as_string(hide_password=True)}: unsupported database "
                        f"({_first_line(e)}): use sqlite:/// or postgresql+psycopg://")


def _where(url) -> str:
    return url.render_as_string(hide_password=True)


def check_storage(storage: str | None) -> None:
    """Fail before any work when the storage cannot be used: driver, server, file, schema."""
    open_storage(storage)


def open_storage(storage: str | None, settings: StudySettings | None = None):
    """The Optuna storage for ``storage`` (None: in memory), schema created, heartbeat set for RDB URLs."""
    import optuna

    if storage is None:
        return optuna.storages.InMemoryStorage()
    path = _journal_path(storage)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        if not path.parent.is_dir():
            raise UserError(f"--storage {storage}: directory {path.parent} does not exist: create it first")
        return JournalStorage(JournalFileBackend(str(path)))
    url = _sa_url(storage)
    _check_driver(url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not Path(url.database).parent.is_dir():
            raise UserError(f"--storage {storage}: directory {Path(url.database).parent} does not exist: "
                            "create it first")
    _ping(url)
    kw: dict[str, Any] = {"engine_kwargs": _engine_kwargs(url)}
    if settings is not None:
        kw.update(heartbeat_interval=settings.heartbeat_interval, grace_period=settings.grace_period,
                  heartbeat_stale_trial_callback=quiet(lambda: optuna.storages.RetryHeartbeatStaleTrialCallback(
                      max_retry=settings.max_retry)))
    return _with_schema_lock(url, lambda: quiet(lambda: optuna.storages.RDBStorage(storage, **kw)))


def _ping(url) -> None:
    """One connection attempt with a short timeout: an unreachable server is a one-line error."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise UserError(f"cannot connect to the storage {_where(url)} ({_first_line(e)}): start the database "
                        "server or fix --storage")
    finally:
        engine.dispose()


def _with_schema_lock(url, make: Callable[[], Any]) -> Any:
    """Run ``make`` (which may create the schema) under a PostgreSQL advisory lock, retried with backoff.

    Two workers on a fresh database both find no tables and both create them; one fails on a duplicate.
    The lock serialises that on PostgreSQL; the retry covers SQLite and other databases (a retry sees the
    tables and skips creating them).
    """
    import sqlalchemy

    lock_engine = None
    conn = None
    if url.get_backend_name() == "postgresql":
        lock_engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
        conn = lock_engine.connect()
        # try-lock with a deadline: a hung (not dead) holder must not block new workers forever; without
        # the lock the retries below still resolve the race
        deadline = time.monotonic() + _LOCK_WAIT_S
        while not conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY}).scalar():
            if time.monotonic() > deadline:
                conn.close()
                conn = None
                break
            time.sleep(0.1)
    try:
        for attempt in range(_SCHEMA_TRIES):
            try:
                return make()
            except sqlalchemy.exc.SQLAlchemyError as e:
                if attempt == _SCHEMA_TRIES - 1:
                    raise UserError(f"cannot set up the Optuna tables in {_where(url)} after {_SCHEMA_TRIES} tries "
                                    f"({_first_line(e)}): check the database's permissions")
                time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
    finally:
        if conn is not None:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
            conn.close()
        if lock_engine is not None:
            lock_engine.dispose()


def quiet(fn: Callable[[], Any]) -> Any:
    """Heartbeats are 'experimental' in Optuna: keep its warning out of every worker's output."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message=r".*`(x0|sigma0)` has been deprecated", category=FutureWarning)
        return fn()


def has_heartbeat(storage: Any) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


# -------------------------------------------------------------------- study
def study_name_for_workbench(wb: Any, budget: float) -> str:
    """A study name keyed on content (model weights, calibration and selection images, settings), never on
    paths: workers whose data sit under other mount points share the study; any change starts a new one."""
    return "rr_alloc-" + study_key_for_workbench(wb, budget)


def study_key_for_workbench(wb: Any, budget: float) -> str:
    """A hash of everything that decides what a trial's score means (the default study name's suffix)."""
    cfg = wb.cfg
    parts = {"model": fingerprint_model(wb.dense), "calib": fingerprint_tensor(wb.splits.calib.x),
             "selection": fingerprint_tensor(wb.splits.selection.x), "budget": float(budget),
             "repair": cfg.search_repair or cfg.repair, "objective": cfg.objective, "unit": cfg.unit,
             "layers": [l.name for l in wb.layers], "s_max": cfg.s_max, "layer_weights": cfg.layer_weights,
             "optimizer": cfg.optimizer}
    if cfg.optimizer == "evo":  # the sampler's moves and the screen change what a trial means
        parts.update(guidance=cfg.guidance, search_step=cfg.search_step, screen_size=cfg.screen_size)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def worker_seed(base_seed: int, created: bool) -> int:
    """The creator keeps the run's seed; joiners and resumers draw their own, so no two workers share a stream."""
    if created:
        return int(base_seed)
    return (int(base_seed) * 1_000_003 + secrets.randbits(32)) % 2**32


def open_study(name: str, storage: Any, make_sampler: Callable[[int], Any], base_seed: int,
               enqueue: Callable[[Any], None], load_only: bool = False, log: Callable[[str], None] | None = None):
    """Create the study or join it. Only the creator runs ``enqueue`` (the warm-start trials).

    Returns ``(study, created)``. ``load_only`` (``--n-trials 0``) never creates: a missing study is an error.
    """
    import optuna

    log = log or (lambda s: print(s, flush=True))
    created = False
    for attempt in range(_SCHEMA_TRIES):
        try:
            if load_only:
                study = optuna.load_study(study_name=name, storage=storage)
            else:
                try:
                    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
                    created = True
                except optuna.exceptions.DuplicatedStudyError:
                    study = optuna.load_study(study_name=name, storage=storage)
            break
        except KeyError:  # load_study of a missing study
            raise UserError(f"no Optuna study {name} in the storage: run a worker with --n-trials > 0 first "
                            "(or pass the --study-name it printed)")
        except Exception as e:  # SQLite 'database is locked' under several writers: back off and retry
            import sqlalchemy

            if not isinstance(e, sqlalchemy.exc.SQLAlchemyError) or attempt == _SCHEMA_TRIES - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
    seed = worker_seed(base_seed, created)
    study.sampler = make_sampler(seed)
    if created:
        enqueue(study)
    n = len(study.get_trials(deepcopy=False))
    hb = "heartbeat on" if has_heartbeat(study._storage) else "no heartbeat (a killed worker's trial stays RUNNING)"
    log(f"optuna study {name}: {'created, warm-start trials enqueued' if created else f'joined ({n} trials)'}; "
        f"worker {worker_id()} seed {seed}; {hb}")
    return study, created


def evaluated(trial: Any) -> bool:
    """A trial that scored a candidate: COMPLETE, or PRUNED by the search's screen (it carries ``screen``).

    Trials a worker pruned because the study was full carry no score and do not count.
    """
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.PRUNED and "screen" in trial.user_attrs)


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


def optimize(study: Any, objective: Callable[[Any], float], settings: StudySettings,
             callbacks: list[Callable[[Any, Any], None]] | None = None) -> None:
    """Add up to ``n_trials`` trials from this process; stop at ``total_trials`` evaluated in the study
    (completed, or screened out by the evolutionary search: each scored a candidate).

    ``callbacks``: Optuna trial callbacks ``(study, frozen_trial)``, e.g. a progress bar.
    """
    import optuna
    from optuna.trial import TrialState

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
            raise optuna.TrialPruned(f"the study holds --total-trials {total}")
        return objective(trial)

    def stop_when_full(study: Any, trial: Any) -> None:
        if n_evaluated(study) >= total:
            study.stop()

    stops = [stop_when_full] if total else []
    with _no_failed_trial_logs():
        quiet(lambda: study.optimize(run, n_trials=settings.n_trials, timeout=settings.timeout,
                                     callbacks=stops + list(callbacks or []), gc_after_trial=False))


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
        raise UserError(f"Optuna study {study.study_name} has no completed trial yet: run a worker with "
                        "--n-trials > 0 (or wait for the running ones)")
    return study.best_trial


def discard_if_empty(db: Path, made: list[Path]) -> None:
    """Remove a SQLite storage this run created (and the folders made for it) if it holds no trial.

    A run that fails before its first trial leaves nothing behind; any trial, even a failed one,
    keeps the file, so an interrupted study can still be resumed.
    """
    import sqlite3

    if db.exists():
        try:
            with contextlib.closing(sqlite3.connect(db)) as con:
                has_trials = con.execute("SELECT COUNT(*) FROM trials").fetchone()[0] > 0
        except sqlite3.Error:
            has_trials = False  # no schema yet: a half-initialised file
        if has_trials:
            return
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
    for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: something else lives there now
            d.rmdir()


def summary_lines(storage: str, objective: str) -> list[str]:
    """One line per study in ``storage``: completed trials and best value."""
    import optuna
    from optuna.trial import TrialState

    st = open_storage(storage)
    out = []
    view = _where(_sa_url(storage)) if "://" in storage else storage  # never print a password
    for summary in optuna.get_all_study_summaries(st, include_best_trial=False):
        # a shared storage holds other studies too: empty, failed-only, multi-objective, running
        name = summary.study_name
        try:
            study = optuna.load_study(study_name=name, storage=st)
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            values = [t.values[0] for t in done if t.values and len(t.values) == 1]
            best = f"{min(values):.4f}" if values else "-"
        except Exception as e:  # a line of the summary never fails a run whose outputs are written
            out.append(f"optuna study {name}: cannot be summarised ({_first_line(e)})")
            continue
        out.append(f"optuna study {name}: {len(done)} completed trials, best {objective} on selection "
                   f"{best}; view: optuna-dashboard {view}")
    return out
