"""Every command protects the same inputs from its output, and a storage that cannot hold a study is refused
before anything is written to it."""

from __future__ import annotations

import pytest
from test_cli import run_cli


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    r = run_cli("search", "--budget", "0.9", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _refused(r, words: str) -> None:
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [["apply"], ["export", "--format", "csv"]])
def test_apply_and_export_never_write_over_the_config_they_read(plan, tmp_path, command):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("seed: 0\n")
    r = run_cli(*command, "--plan", str(plan), "--config", str(cfg), "--out", str(cfg))
    _refused(r, "is the input")
    assert cfg.read_text() == "seed: 0\n"


@pytest.mark.parametrize("command", [["apply"], ["export", "--format", "csv"], ["compare"]])
def test_no_command_writes_inside_an_image_folder(plan, tmp_path, command):
    data = tmp_path / "images"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
    target = data / "a" / "x.png"
    target.write_bytes(b"not touched")
    if command == ["compare"]:
        r = run_cli(
            "compare", "--budgets", "0.9", "--dataset", "imagefolder", "--train-data", str(data), "--test-data",
            str(data), "--out-dir", str(data / "a"),
        )  # fmt: skip
    else:
        r = run_cli(
            *command, "--plan", str(plan), "--dataset", "imagefolder", "--train-data", str(data),
            "--test-data", str(data), "--out", str(target),
        )  # fmt: skip
    _refused(r, "lies inside the input folder")
    assert target.read_bytes() == b"not touched"


@pytest.mark.parametrize(
    "storage, words",
    [
        ("notes.log", "is not an Optuna journal"),
        ("sqlite://", "in-memory SQLite database"),
        ("sqlite:///:memory:", "in-memory SQLite database"),
        ("sqlite:///notes.db", "is not a SQLite database"),
    ],
)
def test_a_storage_that_cannot_hold_a_study_is_refused_untouched(tmp_path, storage, words):
    for name in ("notes.log", "notes.db"):
        (tmp_path / name).write_text("my notes\n")
    out = tmp_path / "run" / "plan.json"
    args = ("search", "--budget", "0.9", "--allocator", "optuna", "--n-trials", "1", "--storage", storage)
    r = run_cli(*args, "--out", str(out), cwd=tmp_path)
    _refused(r, words)
    assert (tmp_path / "notes.log").read_text() == "my notes\n" == (tmp_path / "notes.db").read_text()
    assert not (tmp_path / "run").exists()


def test_a_journal_an_earlier_search_wrote_resumes(tmp_path):
    out = tmp_path / "plan.json"
    args = ("search", "--budget", "0.9", "--allocator", "optuna", "--n-trials", "1", "--storage", "study.log")
    for _ in range(2):
        r = run_cli(*args, "--out", str(out), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "study.log").stat().st_size > 0
