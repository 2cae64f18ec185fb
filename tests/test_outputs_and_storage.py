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


def _folder_with_links(tmp_path):
    """``data/`` whose class ``a`` holds a link to an image kept outside, and whose class ``b`` is a link to a
    folder outside."""
    from helpers import image_folder

    outside = image_folder(tmp_path / "outside", per_class=2)
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "a" / "0.png").symlink_to(outside / "class0" / "img1.png")
    (data / "b").symlink_to(outside / "class1", target_is_directory=True)
    return data, outside


@pytest.mark.parametrize("target", ["class0/img1.png", "class1/plan.json"])
def test_an_output_reached_through_a_link_in_an_image_folder_is_refused(tmp_path, target):
    data, outside = _folder_with_links(tmp_path)
    before = (outside / "class0" / "img1.png").read_bytes()
    r = run_cli(
        "search", "--budget", "0.8", "--dataset", "imagefolder", "--train-data", str(data), "--test-data", str(data),
        "--out", str(outside / target),
    )  # fmt: skip
    _refused(r, "lies inside the input folder")
    assert (outside / "class0" / "img1.png").read_bytes() == before and not (outside / "class1" / "plan.json").exists()


def test_another_programs_sqlite_database_is_refused_untouched(tmp_path):
    import hashlib
    import sqlite3

    db = tmp_path / "app.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE users (name TEXT)")
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    args = ("search", "--budget", "0.9", "--allocator", "optuna", "--n-trials", "1", "--storage", f"sqlite:///{db}")
    _refused(run_cli(*args, "--out", str(tmp_path / "run" / "plan.json")), "is another program's database")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("make", ["damaged", "fifo", "folder"])
def test_a_journal_that_optuna_could_not_read_is_refused_untouched(tmp_path, make):
    import os

    j = tmp_path / "study.log"
    if make == "damaged":
        j.write_text('{"op_code": 0, "worker_id": "x", "study_name": "s", "directions": [1]}\nthis is not json\n')
    elif make == "fifo":
        os.mkfifo(j)
    else:
        j.mkdir()
    before = j.read_text() if make == "damaged" else None
    args = ("search", "--budget", "0.9", "--allocator", "optuna", "--n-trials", "1", "--storage", str(j))
    r = run_cli(*args, "--out", str(tmp_path / "run" / "plan.json"))
    _refused(r, "is not an Optuna journal (line 2" if make == "damaged" else "is not a regular file")
    assert make != "damaged" or j.read_text() == before


@pytest.mark.parametrize("flag", ["--cache-dir", "--storage"])
def test_the_cache_and_the_storage_never_go_into_an_image_folder(tmp_path, flag):
    from helpers import image_folder

    data = image_folder(tmp_path / "data", per_class=4)
    where = str(data / "class0" / "x") if flag == "--cache-dir" else f"sqlite:///{data / 'class0' / 'x.db'}"
    extra = ("--allocator", "optuna", "--n-trials", "1") if flag == "--storage" else ()
    r = run_cli(
        "search", "--budget", "0.8", "--dataset", "imagefolder", "--train-data", str(data), "--test-data", str(data),
        "--model", "cifar_resnet20", "--num-classes", "2", *extra, flag, where, "--out", str(tmp_path / "p.json"),
    )  # fmt: skip
    _refused(r, f"{flag} ")
    assert "lies inside the input folder" in r.stderr and not (data / "class0" / "x").exists()


def test_an_export_to_a_path_ending_in_a_slash_is_refused(plan, tmp_path):
    r = run_cli("export", "--plan", str(plan), "--format", "csv", "--out", str(tmp_path / "newdir") + "/")
    _refused(r, "names a folder (it ends with a slash)")
    assert not (tmp_path / "newdir").exists()


def test_torchscript_output_leaves_no_stale_repair_spec(plan, tmp_path):
    out = tmp_path / "pruned.pt"
    assert run_cli("apply", "--plan", str(plan), "--out", str(out)).returncode == 0
    assert (tmp_path / "pruned.pt.repair.json").exists()  # the default repair attaches output affines
    r = run_cli("apply", "--plan", str(plan), "--out", str(out), "--format", "torchscript")
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr
    assert not (tmp_path / "pruned.pt.repair.json").exists()
