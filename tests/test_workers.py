"""Several Optuna workers on one study: SQLite, PostgreSQL (CI starts a server) and a journal file.

The worker and plan commands are read from the README's "Several machines" section, so the README's
commands are the ones tested; the test appends a tiny slow model (``slow_factory:factory``) and a 1 s
heartbeat with a 3 s grace period. PostgreSQL tests need ``RR_ALLOC_TEST_POSTGRES_URL`` (``.ci/run``
exports it); without it they are skipped, unless ``RR_ALLOC_REQUIRE_POSTGRES=1``, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from rr_alloc.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 10  # completed trials the study must end with: the global-magnitude anchor + sampled ones
ANCHOR_TRIALS = 1  # the default optimizer (evo) enqueues global magnitude once
SMALL = [
    "--model",
    "slow_factory:factory",
    "--repair",
    "bn",
    "--calib-size",
    "64",
    "--selection-size",
    "64",
    "--eval-size",
    "64",
    "--batch-size",
    "64",
    "--grid",
    "0.5",
    "0.9",
    "0.98",
    "--s-max",
    "0.98",
    "--no-verify",
    "--heartbeat-interval",
    "1",
    "--grace-period",
    "3",
]


# ------------------------------------------------------------------ helpers
def readme_commands() -> tuple[list[str], list[str]]:
    """(worker, plan) argument lists of the README's several-machines section, storage left as a variable."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Several machines", 1)[1].split("\n## ", 1)[0]
    cmds = [
        shlex.split(line.strip())[4:]
        for line in section.splitlines()
        if line.strip().startswith("python -m rr_alloc search")
    ]
    (worker,) = [c for c in cmds if "--n-trials" not in c]
    (plan,) = [c for c in cmds if "--n-trials" in c]
    return worker, plan


def with_storage(args: list[str], storage: str, out: Path, *extra: str) -> list[str]:
    args = [storage if a == "$RR_ALLOC_STORAGE" else a for a in args]
    ours = [*SMALL, "--out", str(out), *extra]
    given = {a for a in ours if a.startswith("--")}
    kept, dropped = [], False
    for a in args:  # the README's flags that ours replace are left out (a flag given twice is refused)
        if a.startswith("--"):
            dropped = a in given
        if not dropped:
            kept.append(a)
    return [*kept, *ours]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", RR_ALLOC_SLOW_FORWARD_S="0.2")


def start(args: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "rr_alloc", "search", *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env()
    )


def finish(p: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError(f"worker timed out:\n{log.read_text()}")
    assert rc == 0, log.read_text()


def the_study(storage: str, quick: bool = False):
    """The one study in ``storage`` (None before it exists); ``quick``: give up on a lock within seconds."""
    import optuna

    from rr_alloc.search.storage import open_storage

    if quick:  # never wait on a lock a stopped worker holds (nor take the schema lock)
        args = (
            {"timeout": 1}
            if storage.startswith("sqlite")
            else {"options": "-c lock_timeout=1000 -c statement_timeout=2000"}
        )
        st = optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": args}, skip_table_creation=True)
    else:
        st = open_storage(storage)
    names = optuna.get_all_study_names(st)
    if not names:
        return None
    (name,) = names
    return optuna.load_study(study_name=name, storage=st)


def wait_for(cond, timeout: float, what: str, procs=()):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            v = cond()
        except Exception:  # the storage may not have its tables yet
            v = None
        if v:
            return v
        for p in procs:
            assert p.poll() is None or p.returncode == 0, f"a worker died early waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def check_study(study, total: int) -> list:
    """Assertions every multi-worker run must meet; returns the completed trials."""
    from optuna.trial import TrialState

    from rr_alloc.search.study import evaluated

    trials = study.get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sum(map(evaluated, trials)) == total, [(t.number, t.state.name) for t in trials]
    # evo skips children already in the storage; two workers sampling at the same instant may still
    # draw the same child, so uniqueness is checked per worker
    keys = [(t.user_attrs.get("worker"), tuple(sorted(t.params.items()))) for t in trials if evaluated(t)]
    assert len(set(keys)) == len(keys), "a worker evaluated the same parameters twice"
    enqueued = [t for t in trials if "fixed_params" in t.system_attrs and "failed_trial" not in t.system_attrs]
    assert len(enqueued) == ANCHOR_TRIALS, "the anchor was enqueued more (or less) than once"
    anchors_done = [t for t in done if "fixed_params" in t.system_attrs]
    assert len(anchors_done) == ANCHOR_TRIALS, "the anchor completes exactly once"
    return done


# ---------------------------------------------------------------- storages
@pytest.fixture
def pg_url():
    """A fresh database on the CI server per test (so the workers race on creating its tables)."""
    url = os.environ.get("RR_ALLOC_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("RR_ALLOC_REQUIRE_POSTGRES") == "1":
            pytest.fail("RR_ALLOC_REQUIRE_POSTGRES=1 but RR_ALLOC_TEST_POSTGRES_URL is not set: run .ci/run")
        pytest.skip("no PostgreSQL server: set RR_ALLOC_TEST_POSTGRES_URL (as .ci/run does)")
    import sqlalchemy

    base = sqlalchemy.engine.make_url(url)
    db = f"rr_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sqlalchemy.text(f'CREATE DATABASE "{db}"'))
    yield base.set(database=db).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def rdb_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("pg_url")


# ------------------------------------------------------------------- tests
@pytest.mark.parametrize("search", ["default", "level"])
def test_killed_worker_trial_is_retried(rdb_url, tmp_path, search):
    """Two workers; one SIGKILLed mid-trial; a resumed worker finishes the study (candidates reconstructed by
    the default repair, or stitched from the level database under ``obs``)."""
    from optuna.trial import TrialState

    worker, plan_cmd = readme_commands()
    if search == "level":  # later flags win: the search under obs, scored through the level database
        worker, plan_cmd = (
            [*c, "--repair", "obs>bn>naive@block+logits", "--cache-dir", str(tmp_path / "cache")]
            for c in (worker, plan_cmd)
        )
    logs = {k: tmp_path / f"{k}.log" for k in "abc"}
    # a stops after 3 trials of its own, so the resumed worker c has work left
    a = start(
        with_storage(worker, rdb_url, tmp_path / "a" / "plan.json", "--total-trials", str(TOTAL), "--n-trials", "3"),
        logs["a"],
    )
    b = start(with_storage(worker, rdb_url, tmp_path / "b" / "plan.json", "--total-trials", str(TOTAL)), logs["b"])

    def b_running():
        # b is stopped while we look, so the trial we see RUNNING cannot finish before the SIGKILL lands
        b.send_signal(signal.SIGSTOP)
        try:
            study = the_study(rdb_url, quick=True)
            trials = study.get_trials(deepcopy=False) if study else []
            mine = [
                t
                for t in trials
                if t.state == TrialState.RUNNING
                and "counts" in t.user_attrs  # evaluating
                and t.user_attrs.get("worker", "").endswith(f":{b.pid}")
            ]
            if mine:
                b.send_signal(signal.SIGKILL)
                return mine[0], [t.number for t in trials if t.state == TrialState.COMPLETE]
        finally:
            b.send_signal(signal.SIGCONT)
        return None

    killed, done_before = wait_for(b_running, 120, "worker b to run a trial", (a, b))
    b.wait()
    c = start(with_storage(worker, rdb_url, tmp_path / "c" / "plan.json", "--total-trials", str(TOTAL)), logs["c"])
    finish(a, logs["a"])
    finish(c, logs["c"])

    study = the_study(rdb_url)
    done = check_study(study, TOTAL)
    by_number = {t.number: t for t in study.get_trials()}
    assert all(by_number[n].state == TrialState.COMPLETE for n in done_before), "a completed trial was lost"
    assert by_number[killed.number].state == TrialState.FAIL
    retries = [t for t in done if t.system_attrs.get("failed_trial") == killed.number]
    assert len(killed.params) == len(by_number[0].params) and by_number[killed.number].params == killed.params
    assert len(retries) == 1 and retries[0].params == killed.params, "the killed trial was not re-run"
    assert "heartbeat on" in logs["c"].read_text()

    # any worker writes the plan from the best trial: the README's plan command (in process, to save a start-up)
    out = tmp_path / "best" / "plan.json"
    assert main(["search", *with_storage(plan_cmd, rdb_url, out)]) == 0
    best = min(done, key=lambda t: t.value)
    assert json.loads(out.read_text())["allocator"] == "optuna"
    assert [l["n_pruned"] for l in json.loads(out.read_text())["layers"]] == best.user_attrs["counts"]
    assert len(the_study(rdb_url).get_trials()) == len(study.get_trials())  # --n-trials 0 added nothing


def test_two_workers_on_journal_file_share_no_parameters(tmp_path):
    worker, _ = readme_commands()
    storage = str(tmp_path / "study.log")
    # 4 trials each: both workers must evaluate, however late one of them starts
    procs = [
        (
            start(
                with_storage(worker, storage, tmp_path / k / "plan.json", "--total-trials", "8", "--n-trials", "4"),
                tmp_path / f"{k}.log",
            ),
            tmp_path / f"{k}.log",
        )
        for k in "ab"
    ]
    for p, log in procs:
        finish(p, log)
    check_study(the_study(storage), 8)
    workers = {t.user_attrs["worker"] for t in the_study(storage).trials if t.params}
    assert len(workers) == 2, "both workers should have evaluated trials"


def test_fresh_database_schema_race(rdb_url):
    """Four connections set up the tables of one fresh database at the same moment: all succeed.

    (Without the lock and retries, 1-3 of them fail with 'table studies already exists' on SQLite or a
    unique violation on PostgreSQL.)"""
    import threading

    from rr_alloc.search.storage import open_storage

    barrier, errors = threading.Barrier(4), []

    def one() -> None:
        barrier.wait()
        try:
            open_storage(rdb_url)
        except Exception as e:  # collected, so the assertion shows every failure
            errors.append(repr(e))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors


# ----------------------------------------------------- one-line errors, names
def _bad(tmp_path, capsys, *args: str) -> str:
    out = tmp_path / "run" / "plan.json"
    code = main(["search", "--budget", "0.8", "--allocator", "optuna", *args, "--out", str(out)])
    err = capsys.readouterr()
    assert code == 2, err.out
    assert err.err.startswith("error: ") and err.err.count("\n") == 1 and "Traceback" not in err.err
    assert "rr_alloc search:" not in err.out  # failed before any work
    return err.err


def test_missing_driver_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    err = _bad(tmp_path, capsys, "--storage", "postgresql+psycopg://u@dbhost/rr")
    assert ".[postgres]" in err


def test_unreachable_server_is_one_line_error(tmp_path, capsys):
    pytest.importorskip("psycopg")
    err = _bad(tmp_path, capsys, "--storage", f"postgresql+psycopg://postgres@/rr?host={tmp_path / 'nosocket'}")
    assert "cannot connect" in err and "--storage" in err


def test_bad_storage_and_settings(tmp_path, capsys):
    assert "neither a database URL" in _bad(tmp_path, capsys, "--storage", "study.db")
    assert "--total-trials" in _bad(tmp_path, capsys, "--total-trials", "0")
    assert not (tmp_path / "run").exists()  # no output directory either
    assert "--grace-period" in _bad(tmp_path, capsys, "--heartbeat-interval", "5", "--grace-period", "5")


def test_n_trials_zero_on_missing_study_is_one_line_error(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "search",
                "--budget",
                "0.8",
                "--allocator",
                "optuna",
                "--n-trials",
                "0",
                "--model",
                "factories:tiny_digits_cnn",
                "--calib-size",
                "64",
                "--selection-size",
                "64",
                "--no-verify",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    # refused before any work: the one line, no progress bar, no output left
    assert err.startswith("error: --n-trials 0") and "\n" not in err and "--n-trials > 0" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_study_name_keyed_on_content_not_paths():
    import torch
    from factories import tiny_digits_cnn

    from rr_alloc.config.run_config import RunConfig
    from rr_alloc.profiling.store import fingerprint_model, fingerprint_tensor
    from rr_alloc.search.runner import study_key

    torch.manual_seed(0)
    model = tiny_digits_cnn()
    x = torch.randn(8, 1, 8, 8)

    def session(calib, train_path, seed=0):
        cfg = RunConfig(repair="bn", train_data=train_path, seed=seed)
        splits = SimpleNamespace(calib=SimpleNamespace(x=calib), selection=SimpleNamespace(x=x[:4]))
        return SimpleNamespace(
            cfg=cfg,
            dense=model,
            splits=splits,
            layers=[SimpleNamespace(name="0")],
            data_spec=SimpleNamespace(to_dict=lambda: {"train": train_path}),
            model_fingerprint=fingerprint_model(model),
            data_fingerprints={"calib": fingerprint_tensor(calib), "selection": fingerprint_tensor(x[:4])},
        )

    a = study_key(session(x, "/mnt/a/train"), 0.9)
    assert a == study_key(session(x.clone(), "/data/elsewhere/train", seed=7), 0.9)
    assert a != study_key(session(x + 1, "/mnt/a/train"), 0.9)
    assert a != study_key(session(x, "/mnt/a/train"), 0.8)
    assert re.fullmatch(r"[0-9a-f]{16}", a)
