"""End-to-end CLI runs on the embedded default, and every bad input's one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rr_alloc.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    return subprocess.run(
        [sys.executable, "-m", "rr_alloc", *args], capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def digits_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "plan.json"
    r = run_cli("search", "--budget", "0.9", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_search_default_writes_plan_and_reports(digits_plan):
    out, stdout = digits_plan
    plan = json.loads(out.read_text())
    assert round(plan["achieved_sparsity"], 4) == 0.9
    assert plan["allocator"] == "best-rule"  # the default: the rule with the lowest selection KL
    choice = plan["rule_choice"]
    assert choice["chosen"] == min(choice["scores"], key=choice["scores"].get)
    for k in ("top1", "agreement", "kl", "reference"):
        assert k in plan["verify"]
    assert plan["verify"]["reference"]["allocator"] == "global"
    assert {"name", "sparsity", "n_weights", "shape"} <= set(plan["layers"][0])
    assert (out.parent / "profile.csv").exists() and (out.parent / "rr_curves.png").exists()
    assert "dense top-1" in stdout and "embedded default" in stdout and "global + repair" in stdout
    assert f"best-rule ({choice['chosen']}) + repair" in stdout and f"chose {choice['chosen']}" in stdout


def test_verify_reproduces_search(digits_plan):
    out, _ = digits_plan
    r = run_cli("verify", "--plan", str(out))
    assert r.returncode == 0, r.stderr
    top1 = json.loads(out.read_text())["verify"]["top1"]
    assert f"{100 * top1:.2f}" in r.stdout


def test_same_seed_same_plan(digits_plan, tmp_path):
    out, _ = digits_plan
    assert main(["search", "--budget", "0.9", "--out", str(tmp_path / "p.json"), "--no-verify"]) == 0
    a = json.loads(out.read_text())["layers"]
    b = json.loads((tmp_path / "p.json").read_text())["layers"]
    assert a == b


def test_list_names_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("cifar_resnet20", "rr-greedy", "global", "lamp", "erk", "bn>asr@block+logits"):
        assert name in out


def _bad(tmp_path, capsys, *args):
    out = tmp_path / "plan.json"
    code = main(["search", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())
    return err


def test_bad_budget(tmp_path, capsys):
    assert "(0, 1)" in _bad(tmp_path, capsys, "--budget", "1.5")
    assert "(0, 1)" in _bad(tmp_path, capsys, "--budget", "0")
    assert "number" in _bad(tmp_path, capsys, "--budget", "lots")


def test_no_prunable_layers(tmp_path, capsys):
    assert "no prunable layers" in _bad(tmp_path, capsys, "--budget", "0.9", "--model", "factories:no_prunable")


def test_checkpoint_mismatch(tmp_path, capsys):
    from rr_alloc.models import build_model

    ck = tmp_path.parent / "wrong.pt"
    torch.save(build_model("cifar_resnet20").state_dict(), ck)
    err = _bad(tmp_path, capsys, "--budget", "0.9", "--checkpoint", str(ck))
    assert "does not match the model" in err and "--model" in err


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    ck = tmp_path.parent / "pickled.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, ck)
    assert "weights_only" in _bad(tmp_path, capsys, "--budget", "0.9", "--checkpoint", str(ck))


def test_missing_data_directory(tmp_path, capsys):
    err = _bad(
        tmp_path,
        capsys,
        "--budget",
        "0.9",
        "--model",
        "cifar_resnet20",
        "--dataset",
        "imagefolder",
        "--train-data",
        str(tmp_path / "nope"),
        "--test-data",
        str(tmp_path / "nope"),
    )
    assert "not a directory" in err and "--train-data" in err


def test_calibration_larger_than_data(tmp_path, capsys):
    err = _bad(tmp_path, capsys, "--budget", "0.9", "--calib-size", "5000")
    assert "exceed" in err and "--calib-size" in err


def test_unknown_model(tmp_path, capsys):
    err = _bad(tmp_path, capsys, "--budget", "0.9", "--model", "resnet9000")
    assert "unknown model" in err and "cifar_resnet20" in err


def test_unknown_allocator_and_repair(tmp_path, capsys):
    assert "unknown allocator" in _bad(tmp_path, capsys, "--budget", "0.9", "--allocator", "magic")
    err = _bad(tmp_path, capsys, "--budget", "0.9", "--repair", "asr@nowhere")
    # names the bad step, the sites it may use and a correct example
    assert "'asr@nowhere'" in err and "conv, bn, block, logits" in err and "asr@block+logits" in err


def test_bad_config_file(tmp_path, capsys):
    cfg = tmp_path.parent / "bad.yaml"
    cfg.write_text("modle: digits_resnet\n")
    assert "unknown key 'modle'" in _bad(tmp_path, capsys, "--budget", "0.9", "--config", str(cfg))
    cfg.write_text("checkpoint: ${RR_ALLOC_SURELY_UNSET_VAR}/x.th\n")
    assert "RR_ALLOC_SURELY_UNSET_VAR" in _bad(tmp_path, capsys, "--budget", "0.9", "--config", str(cfg))


def test_user_factory_model_runs(tmp_path):
    out = tmp_path / "plan.json"
    assert (
        main(["search", "--budget", "0.7", "--model", "factories:tiny_digits_cnn", "--out", str(out), "--repair", "bn"])
        == 0
    )
    plan = json.loads(out.read_text())
    assert [l["name"] for l in plan["layers"]] == ["0", "3", "8"]


def test_optuna_study_resumes_from_storage(tmp_path):
    import optuna

    out = tmp_path / "plan.json"
    args = [
        "search",
        "--budget",
        "0.8",
        "--allocator",
        "optuna",
        "--out",
        str(out),
        "--no-verify",
        "--calib-size",
        "128",
        "--selection-size",
        "128",
    ]
    assert main(args + ["--n-trials", "3"]) == 0
    storage = f"sqlite:///{(tmp_path / 'optuna.db').resolve()}"
    assert main(args + ["--n-trials", "2"]) == 0
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    assert len(study.trials) == 5  # evo: screened-out children are PRUNED, still trials of the study
    assert json.loads(out.read_text())["allocator"] == "optuna"


def test_compare_writes_table_and_figure(tmp_path, capsys):
    import pandas as pd

    assert (
        main(
            [
                "compare",
                "--budgets",
                "0.7",
                "0.9",
                "--allocators",
                "global",
                "rr-greedy",
                "--repairs",
                "bn",
                "--out-dir",
                str(tmp_path),
                "--calib-size",
                "128",
                "--selection-size",
                "64",
            ]
        )
        == 0
    )
    df = pd.read_csv(tmp_path / "compare.csv")
    assert {"budget", "allocator", "repair", "top1", "agreement", "kl", "achieved_sparsity"} <= set(df.columns)
    assert len(df) == 4 and (tmp_path / "compare.png").exists()
    assert (df.achieved_sparsity - df.budget).abs().max() < 1e-4


def test_flop_budget_is_named_in_plan(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["search", "--budget", "0.8", "--unit", "flops", "--out", str(out), "--no-verify"]) == 0
    plan = json.loads(out.read_text())
    from rr_alloc.data.splits import digits_arrays
    from rr_alloc.models.digits import pretrained_digits_resnet
    from rr_alloc.nn.layers import layer_macs, prunable_layers

    model = pretrained_digits_resnet()
    layers = prunable_layers(model)
    a = layer_macs(model, layers, digits_arrays()[0][:1])
    n = np.array([l.n_weights for l in layers], float)
    k = np.array([l["n_pruned"] for l in plan["layers"]], float)
    # the MAC-weighted sparsity is the plan's, and each layer is within half a weight of the continuous plan
    assert plan["budget_unit"] == "flops" and plan["achieved_sparsity"] == pytest.approx((a @ k) / (a @ n), rel=1e-12)
    assert abs(plan["achieved_sparsity"] - 0.8) <= 0.5 * a.sum() / (a @ n) + 1e-12


def test_the_default_models_weights_ship_in_the_package_and_are_the_trained_ones():
    import torch

    from rr_alloc.data.splits import digits_arrays, digits_split_indices
    from rr_alloc.models import build_model
    from rr_alloc.models.digits import WEIGHTS

    assert WEIGHTS.is_file() and WEIGHTS.parent.name == "models"  # package data, no training on first use
    a, b = build_model("digits_resnet"), build_model("digits_resnet")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    x, y = digits_arrays()
    _, test_idx = digits_split_indices(len(x))
    with torch.no_grad():
        assert (a(x[test_idx]).argmax(1) == y[test_idx]).float().mean() > 0.98


SHARED = Path(os.environ.get("RR_ALLOC_SHARED", ROOT.parent / "shared"))


@pytest.mark.skipif(not (SHARED / "weights" / "cifar10-resnet").is_dir(), reason="shared/ not present")
def test_real_cifar_resnet20_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("RR_ALLOC_SHARED", str(SHARED))
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "search",
                "--budget",
                "0.9",
                "--config",
                str(ROOT / "configs" / "cifar10_resnet20.yaml"),
                "--calib-size",
                "256",
                "--selection-size",
                "64",
                "--eval-size",
                "500",
                "--repair",  # the config's kd, shortened: this test checks the config's paths, not the repair
                "obs>bn>naive@block+logits>kd:steps=5",
                "--distill-size",
                "512",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    plan = json.loads(out.read_text())
    assert round(plan["achieved_sparsity"], 4) == 0.9
    assert plan["verify"]["dense_top1"] > 0.7  # the akamaster checkpoint scores ~81% on these JPEGs
    assert plan["source"]["checkpoint_sha256"].startswith("12fca82f")
