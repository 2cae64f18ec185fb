"""verify, apply and export check a plan against its model alike: an edited FLOP plan's totals and an edited
N:M plan's pattern are refused by each, and verify labels a FLOP plan's sparsity as MACs."""

from __future__ import annotations

import json

import pytest
from test_cli import run_cli

COMMANDS = [["verify"], ["apply", "--out", "pruned.pt"], ["export", "--format", "csv", "--out", "plan.csv"]]


@pytest.fixture(scope="module")
def flop_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("flops") / "plan.json"
    r = run_cli("search", "--budget", "0.9", "--unit", "flops", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def nm_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("nm") / "plan.json"
    r = run_cli("search", "--pattern", "2:4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _edited(src, tmp_path, **changes):
    d = json.loads(src.read_text())
    d.update(changes)
    p = tmp_path / "edited.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("command", COMMANDS)
def test_an_edited_flop_budget_is_refused(flop_plan, tmp_path, command):
    plan = _edited(flop_plan, tmp_path, budget=0.5, achieved_sparsity=0.5)
    r = run_cli(command[0], "--plan", str(plan), *command[1:], cwd=tmp_path)
    assert r.returncode == 2 and "achieved_sparsity 0.5 is not the MAC sparsity" in r.stderr, r.stderr
    assert not (tmp_path / "pruned.pt").exists() and not (tmp_path / "plan.csv").exists()


@pytest.mark.parametrize("command", COMMANDS[:2])
def test_a_flop_budget_its_layers_do_not_meet_is_refused(flop_plan, tmp_path, command):
    plan = _edited(flop_plan, tmp_path, budget=0.8)
    r = run_cli(command[0], "--plan", str(plan), *command[1:], cwd=tmp_path)
    assert r.returncode == 2 and "budget 0.8 contradicts its layers" in r.stderr, r.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_an_edited_pattern_is_refused(nm_plan, tmp_path, command):
    plan = _edited(nm_plan, tmp_path, pattern="1:4")
    r = run_cli(command[0], "--plan", str(plan), *command[1:], cwd=tmp_path)
    assert r.returncode == 2 and "not what its pattern 1:4 prunes" in r.stderr, r.stderr


def test_verify_labels_a_flop_plans_sparsity_as_macs(flop_plan):
    r = run_cli("verify", "--plan", str(flop_plan))
    assert r.returncode == 0, r.stderr
    header = next(l for l in r.stdout.splitlines() if "top1 %" in l)
    assert "MAC sparsity" in header
    row = next(l for l in r.stdout.splitlines() if "+ repair" in l)
    assert row.split()[-1] == f"{json.loads(flop_plan.read_text())['achieved_sparsity']:.4f}".rstrip("0")


def test_a_plan_verified_on_another_model_names_the_model_it_was_made_for(factory_plan, capsys):
    from rr_alloc.cli import main

    assert main(["verify", "--plan", str(factory_plan), "--model", "digits_resnet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "the plan was made for model factories:tiny_digits_cnn, not digits_resnet" in err
