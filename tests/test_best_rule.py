"""Allocator best-rule: every rule scored end to end on the selection split, the winner's plan returned."""

from __future__ import annotations

from helpers import QUICK, one_error

from rr_alloc import RunConfig, Session, allocate
from rr_alloc.allocators import RULES
from rr_alloc.cli import main
from rr_alloc.plans.plan import Plan

CHANNEL = "bn>naive@block+logits"


def test_best_rule_returns_the_lowest_scoring_rule_and_records_every_score():
    session = Session(RunConfig(calib_size=64, selection_size=32, repair=CHANNEL), progress=False)
    found = allocate(session, "best-rule", 0.9)
    scores = found.choice.scores
    assert set(scores) == set(RULES)
    assert found.choice.rule == min(RULES, key=lambda r: scores[r])  # the first rule at the lowest loss
    assert found.counts == allocate(session, found.choice.rule, 0.9).counts
    assert found.choice.repair == CHANNEL and found.choice.images == 32


def test_search_with_best_rule_writes_the_choice_into_a_plan_that_replays(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["search", "--budget", "0.9", "--allocator", "best-rule", *QUICK, "--repair", CHANNEL]
    assert main([*argv, "--search-repair", "bn", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    plan = Plan.load(out)
    choice = plan.rule_choice
    assert plan.allocator == "best-rule" and choice["repair"] == "bn" and choice["selection_size"] == 32
    assert set(choice["scores"]) == set(RULES) and choice["chosen"] == min(RULES, key=choice["scores"].get)
    assert f"chose {choice['chosen']}" in printed and "rule choice: kl after bn on 32 selection images" in printed
    assert Plan.from_dict(plan.to_dict()).rule_choice == choice
    session = Session(RunConfig(calib_size=64, selection_size=32, repair=CHANNEL), progress=False)
    assert plan.counts == allocate(session, choice["chosen"], 0.9).counts
    capsys.readouterr()
    assert main(["verify", "--plan", str(out)]) == 0
    assert f"best-rule ({choice['chosen']}) + repair" in capsys.readouterr().out


def test_best_rule_refuses_the_search_flags_it_does_not_read(tmp_path, capsys):
    code = main(
        ["search", "--budget", "0.9", "--allocator", "best-rule", "--n-trials", "5", "--out", str(tmp_path / "p.json")]
    )
    err = one_error(capsys, code)
    assert "--n-trials applies to the end-to-end search" in err
    assert not any(tmp_path.iterdir())


def test_best_rule_without_a_selection_split_is_refused_before_any_work(tmp_path, capsys):
    err = one_error(
        capsys, main(["search", "--budget", "0.9", "--selection-size", "0", "--out", str(tmp_path / "p.json")])
    )
    assert "best-rule scores plans on the selection split" in err and "--allocator global" in err
    assert not any(tmp_path.iterdir())


def test_a_reference_that_needs_a_selection_split_is_refused_before_any_work(tmp_path, capsys):
    argv = ["search", "--budget", "0.9", "--allocator", "global", "--reference", "best-rule", "--selection-size", "0"]
    err = one_error(capsys, main([*argv, "--out", str(tmp_path / "p.json")]))
    assert "--reference best-rule scores plans on the selection split" in err
    argv = ["compare", "--budgets", "0.9", "--allocators", "best-rule", "global", "--selection-size", "0"]
    err = one_error(capsys, main([*argv, "--out-dir", str(tmp_path / "c")]))
    assert "--allocators best-rule scores plans" in err and "drop best-rule from --allocators" in err
    assert not any(tmp_path.iterdir())


def test_a_bad_search_repair_is_named_as_such(tmp_path, capsys):
    err = one_error(
        capsys, main(["search", "--budget", "0.9", "--search-repair", "bogus", "--out", str(tmp_path / "p")])
    )
    assert "--search-repair" in err and "--repair 'bogus'" not in err


def test_compare_chooses_the_rule_under_the_first_pipeline_it_verifies(tmp_path, capsys):
    argv = ["compare", "--budgets", "0.9", "--allocators", "best-rule", "--repairs", CHANNEL, *QUICK]
    assert main([*argv, "--out-dir", str(tmp_path / "c")]) == 0
    assert f"rule choice: kl after {CHANNEL} on 32 selection images" in capsys.readouterr().out
