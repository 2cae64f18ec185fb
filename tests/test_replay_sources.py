"""What a replay uses: relative paths resolve against the plan's folder, and the images and weights it
rebuilds are checked against the plan's fingerprints."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import image_folder
from test_cli import run_cli

SEARCH = ("search", "--budget", "0.8", "--model", "cifar_resnet20", "--num-classes", "2", "--repair", "bn")
DATA = ("--dataset", "imagefolder", "--calib-size", "8", "--selection-size", "4")


@pytest.fixture
def layout(tmp_path):
    """``project/data`` (the plan's images), ``project/runs/plan.json`` made from ``project``, and an
    ``elsewhere/data`` holding other images."""
    image_folder(tmp_path / "project" / "data", per_class=8, seed=0)
    image_folder(tmp_path / "elsewhere" / "data", per_class=8, seed=1)
    r = run_cli(
        *SEARCH, *DATA, "--train-data", "data", "--test-data", "data", "--out", "runs/plan.json",
        cwd=tmp_path / "project",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return tmp_path


def _row(stdout: str) -> list[str]:
    return next(l.split() for l in stdout.splitlines() if "+ repair" in l)


def test_relative_paths_are_written_relative_to_the_plan(layout):
    src = json.loads((layout / "project" / "runs" / "plan.json").read_text())["source"]
    assert src["paths"] == "plan" and src["data"]["train"] == "../data" and src["data"]["test"] == "../data"
    assert set(src["data_fingerprint"]) == {"calib", "selection", "test"}


def test_verify_from_another_folder_uses_the_plans_images(layout):
    plan = layout / "project" / "runs" / "plan.json"
    here = run_cli("verify", "--plan", "runs/plan.json", cwd=layout / "project")
    there = run_cli("verify", "--plan", str(plan), cwd=layout / "elsewhere")  # its own data/ holds other images
    assert here.returncode == 0 and there.returncode == 0, here.stderr + there.stderr
    assert _row(here.stdout) == _row(there.stdout)


def test_other_images_where_the_plan_points_are_refused(layout):
    shutil.rmtree(layout / "project" / "data")
    shutil.copytree(layout / "elsewhere" / "data", layout / "project" / "data")
    r = run_cli("verify", "--plan", "runs/plan.json", cwd=layout / "project")
    assert r.returncode == 2 and r.stderr.count("error:") == 1, r.stderr
    assert "are not the ones the plan was made from" in r.stderr and "--train-data" in r.stderr


def test_test_images_the_user_names_are_the_users_choice(layout):
    r = run_cli("verify", "--plan", "runs/plan.json", "--test-data", "../elsewhere/data", cwd=layout / "project")
    assert r.returncode == 0, r.stderr


def test_a_plan_without_a_checkpoint_is_replayed_on_the_same_weights(layout):
    plan = layout / "project" / "runs" / "plan.json"
    d = json.loads(plan.read_text())
    d["source"]["model_fingerprint"] = "0" * 64
    plan.write_text(json.dumps(d))
    r = run_cli("verify", "--plan", "runs/plan.json", cwd=layout / "project")
    assert r.returncode == 2 and "has other weights than the one the plan was made from" in r.stderr, r.stderr


def test_a_checkpoint_passed_to_a_plan_made_without_one_must_hold_its_weights(tmp_path):
    import torch

    from rr_alloc.models import build_model

    out = tmp_path / "plan.json"
    assert run_cli("search", "--budget", "0.9", "--out", str(out)).returncode == 0
    sd = build_model("digits_resnet", None, False).state_dict()
    torch.save(sd, tmp_path / "same.pt")
    torch.save({k: v * 0.5 if v.is_floating_point() else v for k, v in sd.items()}, tmp_path / "half.pt")
    assert run_cli("verify", "--plan", str(out), "--checkpoint", str(tmp_path / "same.pt")).returncode == 0
    r = run_cli("verify", "--plan", str(out), "--checkpoint", str(tmp_path / "half.pt"))
    assert r.returncode == 2 and "gives other weights than the model the plan was made from" in r.stderr, r.stderr
