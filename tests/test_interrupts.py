"""Signals and closed pipes: a terminated run leaves no stray file, a run interrupted after its outputs are in
place is a finished run, and a closed standard output does not lose the plan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from test_cli import ROOT

from rr_alloc.cli import main
from rr_alloc.search.storage import discard_if_empty


def _popen(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    cmd = [sys.executable, "-m", "rr_alloc", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_closed_standard_output_does_not_lose_the_plan(tmp_path):
    p = _popen("search", "--budget", "0.9", "--out", "run/plan.json", cwd=tmp_path)
    p.stdout.readline()
    p.stdout.close()  # as `| head -1` does
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert (tmp_path / "run" / "plan.json").exists()


def test_sigterm_leaves_no_staged_files_and_exits_143(tmp_path):
    (tmp_path / "run").mkdir()
    p = _popen("search", "--budget", "0.9", "--repair", "obs>bn>naive@block+logits>kd", "--out", "run/plan.json",
               cwd=tmp_path)  # fmt: skip
    p.stdout.readline()  # the run has started
    time.sleep(1.5)
    p.send_signal(signal.SIGTERM)
    code = p.wait(timeout=120)
    err = p.stderr.read()
    assert code == 143 and err.strip().splitlines()[-1] == "error: terminated", err
    assert list((tmp_path / "run").iterdir()) == []


def test_an_interrupt_after_the_outputs_are_in_place_ends_a_finished_run(tmp_path, monkeypatch, capsys):
    import rr_alloc.cli.compare_cmd as compare_cmd

    real = compare_cmd.outputs_in_place

    def then_interrupt() -> None:
        real()
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_cmd, "outputs_in_place", then_interrupt)
    code = main(["compare", "--budgets", "0.9", "--allocators", "global", "--out-dir", str(tmp_path / "c")])
    assert code == 0 and "interrupted after the outputs were written" in capsys.readouterr().err
    assert {f.name for f in (tmp_path / "c").iterdir()} == {"compare.csv", "compare_layers.csv", "compare.png"}


def test_a_storage_this_run_made_is_removed_when_no_trial_was_evaluated(tmp_path):
    db = tmp_path / "optuna.db"
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="s")
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    discard_if_empty(db, [])
    assert not db.exists()
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="s")
    study.tell(study.ask(), 1.0)
    discard_if_empty(db, [])
    assert db.exists()


def test_a_closed_or_full_standard_output_does_not_lose_the_plan(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    for name, stdout in (("closed", None), ("full", "/dev/full")):
        cmd = [sys.executable, "-m", "rr_alloc", "search", "--budget", "0.9", "--no-verify", "--out", f"{name}/p.json"]
        if stdout is None:  # as `>&-` leaves it: no standard output at all
            r = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: os.close(1))  # fmt: skip
        else:
            with open(stdout, "w") as full:
                r = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=full, stderr=subprocess.PIPE, text=True)
        assert r.returncode == 0 and (tmp_path / name / "p.json").exists(), r.stderr
