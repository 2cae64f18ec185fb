"""search, compare and the replays refuse what they would ignore or misread, naming the right flag."""

from __future__ import annotations

import json

import pytest
from test_cli import run_cli


@pytest.mark.parametrize(
    "args, words",
    [
        (["--reference", "optuna"], "--reference optuna is a search, not a rule"),
        (["--pretrained"], "--pretrained: digits_resnet has no downloadable weights"),
        (["--out", ""], "--out is empty"),
        (["--profile-repair", "lsq:damp=nan"], "(in --profile-repair 'lsq:damp=nan')"),
        (
            ["--allocator", "optuna", "--repair", "obs>bn>naive@block+logits", "--search-step", "0.1"],
            "--search-step applies to the fraction-move search",
        ),
        (
            ["--allocator", "optuna", "--repair", "obs>bn>naive@block+logits", "--screen-size", "64"],
            "--screen-size applies to the fraction-move search",
        ),
    ],
)
def test_search_refuses_what_it_would_ignore(tmp_path, args, words):
    r = run_cli("search", "--budget", "0.9", *args, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and words in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())


def test_compare_names_a_device_given_as_its_folder(tmp_path):
    r = run_cli("compare", "--budgets", "0.9", "--out-dir", "/dev/null")
    assert r.returncode == 2 and "is a character device, not a folder" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    # magnitude masks (the channel-wise repair), so that an edit to the mask rule contradicts the plan
    argv = ("search", "--budget", "0.9", "--exclude", "linear", "--repair", "bn>naive@block+logits", "--out", str(out))
    assert run_cli(*argv).returncode == 0
    return out


def test_a_plan_without_source_replays_with_the_flags_its_error_asks_for(plan, tmp_path):
    d = json.loads(plan.read_text())
    del d["source"]
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d))
    r = run_cli("verify", "--plan", str(p))
    assert r.returncode == 2 and "pass --model" in r.stderr, r.stderr
    r = run_cli("verify", "--plan", str(p), "--model", "digits_resnet", "--dataset", "digits")
    assert r.returncode == 0, r.stderr


def test_a_plan_whose_pattern_matches_nothing_now_still_replays(plan, tmp_path):
    d = json.loads(plan.read_text())
    d["source"]["exclude"] = ["no_such_layer*"]  # as an older build allowed
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d))
    r = run_cli("verify", "--plan", str(p))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("text", ["pattern: '2:4'", "allocator: lamp", "out: x/plan.json"])
def test_compare_refuses_config_keys_it_would_ignore(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text + "\n")
    r = run_cli("compare", "--budgets", "0.9", "--allocators", "uniform", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2 and "does not apply to compare" in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["--stages", "10000"], ["--ladder-step", "0.2"]])
def test_level_search_flags_are_refused_under_the_fraction_search(tmp_path, args):
    fraction = ("--repair", "bn>naive@block+logits")  # no re-fit first: candidates move by fractions
    r = run_cli("search", "--budget", "0.9", "--allocator", "optuna", "--n-trials", "1", *fraction, *args, cwd=tmp_path)
    assert r.returncode == 2 and "applies to the level search" in r.stderr and not any(tmp_path.iterdir()), r.stderr


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"repair": "bogus>step"}, "in the plan's repair 'bogus>step'"),
        ({"version": 2, "mask_rule": "obs"}, "has no obs step to choose the masks: the plan was edited"),
        ({"budget_unit": "flops", "achieved_sparsity": None}, "in FLOPs but has no achieved_sparsity"),
    ],
)
def test_an_edited_plan_is_named_as_the_problem(plan, tmp_path, edit, words):
    d = json.loads(plan.read_text())
    d.update(edit)
    if d["achieved_sparsity"] is None:
        del d["achieved_sparsity"]
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d))
    r = run_cli("verify", "--plan", str(p))
    assert r.returncode == 2 and words in r.stderr and "--repair" not in r.stderr, r.stderr
