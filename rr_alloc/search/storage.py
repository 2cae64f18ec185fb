"""Optuna storages shared by several workers (processes or machines): opened and checked before any work.

A storage URL (``sqlite:///...``, ``postgresql+psycopg://...``, any SQLAlchemy URL, or a journal file
``*.log``) is checked before any work: a missing driver or an unreachable server is one ``UserError`` line.
Creating the schema of a fresh database races between workers (both see no tables, one fails), so it runs
under a PostgreSQL advisory lock and is retried with jittered backoff on every backend.

Heartbeats (RDB storages only): a worker killed mid-trial stops beating; after the grace period the next
trial of any worker marks it failed and ``RetryHeartbeatStaleTrialCallback`` re-enqueues it with the same
parameters (at most ``max_retry`` times). Studies on a storage live in ``optuna_study.py``.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = [
    "Heartbeat",
    "check_storage",
    "open_storage",
    "heartbeats_on",
    "discard_if_empty",
    "storage_file",
    "describe_storage",
    "JOURNAL_SUFFIXES",
    "quiet",
    "retry_locked",
    "first_line",
]

JOURNAL_SUFFIXES = (".log", ".journal")
_SCHEMA_TRIES = 8  # fresh-database races resolve in one or two retries; 8 covers many workers
_CONNECT_TIMEOUT_S = 5  # an unreachable server fails fast instead of hanging the worker
_SQLITE_BUSY_S = 60  # workers and heartbeat threads share one SQLite file: wait for its lock
_LOCK_KEY = 0x72725F616C6C6F63  # PostgreSQL advisory-lock key of the schema set-up ("rr_alloc")
_LOCK_WAIT_S = 60


@dataclass(frozen=True)
class Heartbeat:
    """Heartbeat settings of an RDB storage: a killed worker's trial fails after ``grace_period`` seconds
    (None: Optuna's default, twice the interval) and is re-run at most ``max_retry`` times."""

    interval: int = 60
    grace_period: int | None = None
    max_retry: int = 2

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise UserError(f"--heartbeat-interval must be a whole number of seconds >= 1, got {self.interval}")
        if self.grace_period is not None and self.grace_period <= self.interval:
            raise UserError(
                f"--grace-period ({self.grace_period} s) must exceed --heartbeat-interval "
                f"({self.interval} s), or a live worker's trial is failed"
            )
        if self.max_retry < 0:
            raise UserError(f"--max-retry must be >= 0, got {self.max_retry}")


# ------------------------------------------------------------------ storage
def _journal_path(url: str) -> Path | None:
    """A journal file's path, or None for a database URL; anything else is a one-line error."""
    if "://" in url:
        return None
    if url.endswith(JOURNAL_SUFFIXES):
        return Path(url)
    raise UserError(
        f"--storage {url!r} is neither a database URL (sqlite:///FILE, postgresql+psycopg://...) "
        f"nor a journal file ({' or '.join(JOURNAL_SUFFIXES)})"
    )


def _sa_url(url: str):
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url)
    except Exception as e:  # sqlalchemy.exc.ArgumentError and friends
        raise UserError(
            f"--storage {url!r} is not a valid database URL ({first_line(e)}): "
            "use e.g. sqlite:///runs/optuna.db or postgresql+psycopg://USER@HOST/DB"
        )


def first_line(e: BaseException) -> str:
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
        hint = (
            'pip install -e ".[postgres]" (psycopg 3 and SQLAlchemy 2) and use postgresql+psycopg://'
            if url.get_backend_name() == "postgresql"
            else "install the driver for this database"
        )
        raise UserError(
            f"--storage {url.drivername}:// needs a database driver that is not installed ({first_line(e)}): {hint}"
        )
    except Exception as e:  # unknown dialect name
        raise UserError(
            f"--storage {url.render_as_string(hide_password=True)}: unsupported database "
            f"({first_line(e)}): use sqlite:/// or postgresql+psycopg://"
        )


def _where(url) -> str:
    return url.render_as_string(hide_password=True)


def check_storage(storage: str | None) -> None:
    """Fail before any work when the storage cannot be used: driver, server, file, schema."""
    open_storage(storage)


def open_storage(storage: str | None, heartbeat: Heartbeat | None = None):
    """The Optuna storage for ``storage`` (None: in memory), schema created, ``heartbeat`` set for RDB URLs."""
    import optuna

    if storage is None:
        return optuna.storages.InMemoryStorage()
    path = _journal_path(storage)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        if not path.parent.is_dir():
            raise UserError(f"--storage {storage}: directory {path.parent} does not exist: create it first")
        _check_journal(path, storage)  # before Optuna appends its first record to someone else's file
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except ValueError as e:  # an existing file that is not an Optuna journal (JSON lines)
            raise UserError(
                f"--storage {storage} is not an Optuna journal ({first_line(e)}): pass a new or a journal file"
            ) from None
    url = _sa_url(storage)
    _check_driver(url)
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:") or str(url.database).startswith("file::memory:"):
            raise UserError(
                f"--storage {storage} is an in-memory SQLite database, which keeps no study beyond this run: pass "
                "sqlite:///FILE, or leave --storage out (a SQLite file beside the plan)"
            )
        db = Path(url.database)
        if not db.parent.is_dir():
            raise UserError(f"--storage {storage}: directory {db.parent} does not exist: create it first")
        _check_sqlite(db, storage)
    _ping(url)
    kw: dict[str, Any] = {"engine_kwargs": _engine_kwargs(url)}
    if heartbeat is not None:
        kw.update(
            heartbeat_interval=heartbeat.interval,
            grace_period=heartbeat.grace_period,
            heartbeat_stale_trial_callback=quiet(
                lambda: optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=heartbeat.max_retry)
            ),
        )
    return _with_schema_lock(url, lambda: quiet(lambda: optuna.storages.RDBStorage(storage, **kw)))


SQLITE_MAGIC = b"SQLite format 3\x00"


def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise UserError(f"cannot read the storage {path} ({first_line(e)}): fix its permissions or pass another")


def _check_regular(path: Path, storage: str) -> None:
    if (path.exists() or path.is_symlink()) and not (path.is_file() and not path.is_symlink() or _real_file(path)):
        raise UserError(
            f"--storage {storage}: {path} is not a regular file (a folder, a pipe, a device or a dangling link)"
        )


def _real_file(path: Path) -> bool:
    """A symbolic link that leads to a regular file (a shared storage may well be reached through one)."""
    return path.is_symlink() and path.resolve().is_file()


def _check_journal(path: Path, storage: str) -> None:
    """An existing file must be a regular file whose every line is an Optuna journal record (a JSON object with
    an op_code): Optuna appends to it and then fails on any other line."""
    _check_regular(path, storage)
    if not path.exists() or not path.stat().st_size:
        return
    n = 0
    try:
        with open(path, "rb") as f:
            for line in f:
                n += 1
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or "op_code" not in record:
                        raise ValueError
    except (ValueError, TypeError):  # not JSON, not an object, not UTF-8
        raise UserError(
            f"--storage {storage} is not an Optuna journal (line {n} is no journal record): pass a new file or a "
            "journal an earlier search wrote, intact"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read the storage {path} ({first_line(e)}): fix its permissions or pass another")


def _check_sqlite(db: Path, storage: str) -> None:
    """An existing file must be a SQLite database that holds an Optuna study or nothing yet: a database of
    something else would get Optuna's tables added to it."""
    _check_regular(db, storage)
    if not db.exists() or not db.stat().st_size:
        return
    if _head(db, len(SQLITE_MAGIC)) != SQLITE_MAGIC:
        raise UserError(f"--storage {storage}: {db} is not a SQLite database: pass a new file or an Optuna one")
    import sqlite3

    try:  # read only: SQLite's own catalogue of the file's tables
        with contextlib.closing(sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as e:
        raise UserError(f"--storage {storage}: {db} is not a readable SQLite database ({e}): pass a new file")
    if tables and "studies" not in tables:
        shown = ", ".join(sorted(tables)[:3])
        raise UserError(
            f"--storage {storage}: {db} is another program's database (tables {shown}): pass a new file or an "
            "Optuna storage"
        )


def _ping(url) -> None:
    """One connection attempt with a short timeout: an unreachable server is a one-line error."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise UserError(
            f"cannot connect to the storage {_where(url)} ({first_line(e)}): start the database server or fix --storage"
        )
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
                    raise UserError(
                        f"cannot set up the Optuna tables in {_where(url)} after {_SCHEMA_TRIES} tries "
                        f"({first_line(e)}): check the database's permissions"
                    )
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
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
        return fn()


def heartbeats_on(storage: Any) -> bool:
    """Whether ``storage`` records heartbeats (an RDB storage opened with a heartbeat interval)."""
    import optuna

    return isinstance(storage, optuna.storages.RDBStorage) and storage.heartbeat_interval is not None


def retry_locked(make: Callable[[], Any]) -> Any:
    """``make()``, retried with jittered backoff while SQLite reports 'database is locked' (several writers)."""
    import sqlalchemy

    for attempt in range(_SCHEMA_TRIES):
        try:
            return make()
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == _SCHEMA_TRIES - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))


def describe_storage(storage: str) -> str:
    """The storage as it may be printed: a database URL without its password, or the journal's path."""
    return _where(_sa_url(storage)) if "://" in storage else storage


def storage_file(storage: str) -> Path | None:
    """The local file behind a storage URL (a SQLite database or a journal), else ``None``."""
    path = _journal_path(storage)
    if path is not None:
        return path
    url = _sa_url(storage)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return Path(url.database)
    return None


def discard_if_empty(db: Path, made: list[Path]) -> None:
    """Remove a storage file (SQLite or journal) this run created, and the folders made for it, if it holds
    no evaluated trial.

    A run that ends before its first evaluation (failed or interrupted trials only) leaves nothing behind; a
    completed or screened-out trial keeps the file, so an interrupted study can still be resumed.
    """
    import optuna

    if db.exists():
        try:
            if db.name.endswith(JOURNAL_SUFFIXES):
                from optuna.storages.journal import JournalFileBackend, JournalStorage

                storage = JournalStorage(JournalFileBackend(str(db)))
            else:
                storage = quiet(lambda: optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}"))
            summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
            kept = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # evaluations, not attempts
            has_trials = any(
                optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False, states=kept)
                for s in summaries
                if s.n_trials
            )
            if isinstance(storage, optuna.storages.RDBStorage):
                storage.remove_session()
                storage.engine.dispose()
        except Exception:  # not an Optuna storage (yet): a half-initialised file
            has_trials = False
        if has_trials:
            return
        for suffix in ("", "-journal", "-wal", "-shm", ".lock"):
            Path(str(db) + suffix).unlink(missing_ok=True)
    for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: something else lives there now
            d.rmdir()
