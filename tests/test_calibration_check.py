"""The calibration check: under the default repair, BatchNorm recalibration on the calibration images is tried
on the dense model first; when it moves the dense model the default leaves ``bn`` out, says so once and records
the figures; another repair the user chose is never changed (the default's own text is the default)."""

from __future__ import annotations

import json

from rr_alloc.cli import main
from rr_alloc.repair import DEFAULT_REPAIR, DEFAULT_WITHOUT_BN

QUICK = ("--budget", "0.5", "--calib-size", "128", "--selection-size", "64")


def _search(tmp_path, capsys, *args: str) -> tuple[dict, str]:
    out = tmp_path / "plan.json"
    assert main(["search", *QUICK, *args, "--out", str(out)]) == 0, capsys.readouterr().err
    return json.loads(out.read_text()), capsys.readouterr().out


def test_recalibration_that_moves_the_dense_model_leaves_bn_out_of_the_default(tmp_path, capsys):
    plan, out = _search(tmp_path, capsys, "--model", "factories:shifted_digits_resnet")
    check = plan["calibration"]["bn_check"]
    assert check["moves"] and check["agreement"] < check["min_agreement"] and check["n"] == 64
    assert plan["repair"] == DEFAULT_WITHOUT_BN and plan["verify"]["repair"] == DEFAULT_WITHOUT_BN
    assert out.count("note: BatchNorm recalibration on the calibration images moves the dense model") == 1
    assert "pass --repair to choose (obs:damp=auto>bn>naive@block+logits keeps bn)" in out  # the way to keep bn
    assert main(["verify", "--plan", str(tmp_path / "plan.json"), "--trust-plan-model"]) == 0  # its own pipeline
    assert f"prune -> {DEFAULT_WITHOUT_BN} ->" in capsys.readouterr().out


def test_matched_calibration_images_keep_bn_and_a_chosen_repair_is_never_changed(tmp_path, capsys):
    plan, out = _search(tmp_path / "a", capsys)  # the embedded digits model on its own images
    assert plan["repair"] == DEFAULT_REPAIR and not plan["calibration"]["bn_check"]["moves"]
    assert "moves the dense model" not in out
    chosen = "obs:damp=auto>bn>naive@block+logits"  # the default's pipeline, written out by the user
    plan, out = _search(tmp_path / "b", capsys, "--model", "factories:shifted_digits_resnet", "--repair", chosen)
    assert plan["repair"] == DEFAULT_REPAIR and "bn_check" not in plan["calibration"]
    assert "moves the dense model" not in out
    # its replay keeps bn as recorded (the plan's text is the default's) and runs no check that would say otherwise
    assert main(["verify", "--plan", str(tmp_path / "b" / "plan.json"), "--trust-plan-model"]) == 0
    said = capsys.readouterr().out
    assert f"prune -> {DEFAULT_REPAIR} ->" in said and "moves the dense model" not in said


def test_without_a_selection_split_the_check_says_it_could_not_run(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["search", "--budget", "0.5", "--allocator", "global", "--calib-size", "128", "--selection-size", "0"]
    args.append("--no-verify")
    assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    plan, said = json.loads(out.read_text()), capsys.readouterr().out
    assert plan["repair"] == DEFAULT_REPAIR and "bn_check" not in plan["calibration"]
    assert said.count("note: no selection split (--selection-size 0), so the calibration check cannot run") == 1
