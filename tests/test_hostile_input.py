"""A hostile but realistic user: wrong numbers are never printed with exit 0, good files are never replaced,
every refusal is one ``error:`` line, and input that would be ignored is refused instead."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from test_bad_input import _bad_search, _one_error

from rr_alloc.cli import main

QUICK = ("--calib-size", "64", "--selection-size", "32")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A plan from ``search --budget 0.9`` on the embedded default."""
    out = tmp_path_factory.mktemp("good") / "plan.json"
    assert main(["search", "--budget", "0.9", "--no-verify", *QUICK, "--out", str(out)]) == 0
    return out


def _copy(plan: Path, tmp_path: Path, **changes) -> Path:
    d = json.loads(plan.read_text())
    d.update(changes)
    p = tmp_path / "changed.json"
    p.write_text(json.dumps(d))
    return p


def _refused(capsys, argv: list[str]) -> str:
    return _one_error(capsys, main(argv))


# -------------------------------------------------------------- a plan decides what it is
@pytest.mark.parametrize("cmd", ["verify", "apply", "export"])
def test_replaying_commands_refuse_flags_the_plan_decides(good, tmp_path, capsys, cmd):
    extra = {"apply": ["--out", str(tmp_path / "p.pt")], "export": ["--format", "csv", "--out", str(tmp_path / "x")]}
    err = _refused(capsys, [cmd, "--plan", str(good), "--pattern", "2:4", *extra.get(cmd, [])])
    assert "--pattern" in err
    assert "--n-trials" in _refused(capsys, [cmd, "--plan", str(good), "--n-trials", "3", *extra.get(cmd, [])])
    assert not list(tmp_path.iterdir())


def test_plan_totals_must_agree_with_its_layers(good, tmp_path, capsys):
    err = _refused(capsys, ["verify", "--plan", str(_copy(good, tmp_path, achieved_sparsity=0.1))])
    assert "achieved_sparsity 0.1 contradicts its layers" in err
    err = _refused(capsys, ["verify", "--plan", str(_copy(good, tmp_path, budget=0.5))])
    assert "budget 0.5 contradicts its layers" in err


def test_plan_numbers_too_large_or_empty_layers_are_one_line(good, tmp_path, capsys):
    text = good.read_text().replace('"n_weights": 144', '"n_weights": 1e400', 1)
    (tmp_path / "big.json").write_text(text)
    assert "n_weights" in _refused(capsys, ["verify", "--plan", str(tmp_path / "big.json")])
    d = json.loads(good.read_text())
    d["layers"][0].update(n_weights=0, n_pruned=0, sparsity=0.0)
    (tmp_path / "zero.json").write_text(json.dumps(d))
    err = _refused(capsys, ["verify", "--plan", str(tmp_path / "zero.json")])
    assert "layers[0].n_weights: 0 is less than the minimum of 1" in err


def test_torch_pruning_export_ignores_the_models_classifier_whatever_the_plan_lists(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["search", "--budget", "0.9", "--no-verify", *QUICK, "--exclude", "linear", "--out", str(plan)]) == 0
    last_planned = json.loads(plan.read_text())["layers"][-1]["name"]
    out = tmp_path / "tp.py"
    assert main(["export", "--plan", str(plan), "--format", "torch-pruning", "--out", str(out)]) == 0
    import ast

    line = next(line for line in out.read_text().splitlines() if line.startswith("IGNORED = "))
    ignored = ast.literal_eval(line.split("=", 1)[1].strip())
    # the classifier comes first: the model's own, not the plan's last layer
    assert ignored[0] == "linear" and last_planned == "layer2.0.shortcut.0"
    assert "classifier 'linear'" in out.read_text()


# ------------------------------------------------------------------- checkpoints and sizes
@pytest.mark.parametrize("dtype", [torch.int8, torch.complex64])
def test_quantised_or_complex_checkpoints_are_refused(tmp_path, capsys, dtype):
    from rr_alloc.models import build_model

    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in build_model("cifar_resnet20").state_dict().items()}
    ck = tmp_path / "ck.pt"
    torch.save(sd, ck)
    err = _bad_search(tmp_path, capsys, "--budget", "0.9", "--model", "cifar_resnet20", "--checkpoint", str(ck))
    assert str(dtype).replace("torch.", "") in err and "floating-point checkpoint" in err


def test_an_eval_size_beyond_the_test_set_is_refused(tmp_path, capsys):
    err = _bad_search(tmp_path, capsys, "--budget", "0.9", "--eval-size", "100000", *QUICK)
    assert "exceeds the 397 test images" in err


# ------------------------------------------------------------------- good files are kept
@pytest.mark.parametrize("cmd", ["apply", "export"])
def test_an_output_that_is_the_input_plan_is_refused(good, tmp_path, capsys, cmd):
    plan = tmp_path / "plan.json"
    plan.write_text(good.read_text())
    before = plan.read_bytes()
    extra = ["--format", "csv"] if cmd == "export" else []
    err = _refused(capsys, [cmd, "--plan", str(plan), *extra, "--out", str(plan)])
    assert "is the input" in err and plan.read_bytes() == before


def test_an_interrupted_search_leaves_the_old_plan(good, tmp_path, capsys, monkeypatch):
    out = tmp_path / "plan.json"
    out.write_text(good.read_text())
    before = out.read_bytes()
    from rr_alloc import evidence

    def interrupted(session):
        raise KeyboardInterrupt

    monkeypatch.setattr(evidence, "profile", interrupted)
    code = main(["search", "--budget", "0.8", "--no-verify", "--allocator", "rr-greedy", *QUICK, "--out", str(out)])
    assert code == 130 and "error: interrupted" in capsys.readouterr().err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_a_failing_profile_repair_replaces_nothing(good, tmp_path, capsys):
    out = tmp_path / "plan.json"
    out.write_text(good.read_text())
    before = out.read_bytes()
    args = ["search", "--budget", "0.9", "--profile-repair", "asr", "--no-verify", "--allocator", "rr-greedy"]
    assert "--profile-repair 'asr'" in _refused(capsys, [*args, *QUICK, "--out", str(out)])
    assert out.read_bytes() == before


def test_outputs_that_are_links_devices_or_another_output_are_refused(good, tmp_path, capsys):
    link = tmp_path / "link.json"
    link.symlink_to(good)
    assert "symbolic link" in _refused(capsys, ["search", "--budget", "0.9", "--out", str(link)])
    assert "symbolic link" in _refused(capsys, ["search", "--budget", "0.9", "--out", "/proc/self/fd/1"])
    assert "character device" in _refused(capsys, ["search", "--budget", "0.9", "--out", "/dev/null"])
    err = _refused(capsys, ["search", "--budget", "0.9", "--out", str(tmp_path / "r" / "profile.csv")])
    assert "another file" in err
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "profile.csv").mkdir()
    assert "not a regular file" in _refused(
        capsys, ["search", "--budget", "0.9", "--out", str(tmp_path / "s" / "p.json")]
    )
    assert link.resolve() == good.resolve()


# --------------------------------------------------------------------------- patterns
@pytest.mark.parametrize(
    "pattern,words", [("1:3", "prunes nothing"), ("1:99999999999999999999", "prunes nothing"), (" 2:4", "must be N:M")]
)
def test_patterns_that_prune_nothing_or_are_malformed_are_one_line(tmp_path, capsys, pattern, words):
    assert words in _bad_search(tmp_path, capsys, "--pattern", pattern, *QUICK)


@pytest.mark.parametrize(
    "flag", [("--allocator", "rr-greedy"), ("--reference", "lamp"), ("--unit", "flops"), ("--layer-weights", "uniform")]
)
def test_allocation_flags_beside_a_pattern_are_refused_not_ignored(tmp_path, capsys, flag):
    err = _bad_search(tmp_path, capsys, "--pattern", "2:4", *QUICK, *flag)
    assert f"{flag[0]} does not apply with --pattern" in err and "--budget instead" in err


# --------------------------------------------------------------------------- commands
@pytest.mark.parametrize("flag,values", [("--budgets", ["0.9", "0.9"]), ("--allocators", ["global", "global"])])
def test_compare_refuses_repeated_values_before_writing(tmp_path, capsys, flag, values):
    args = ["compare", flag, *values, *QUICK, "--out-dir", str(tmp_path / "c")]
    if flag == "--allocators":
        args[1:1] = ["--budgets", "0.9"]
    assert "twice" in _refused(capsys, args)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--pattern", "2:4"], "--pattern does not apply to compare"),
        (["--allocator", "lamp"], "--allocator does not apply to compare"),
        (["--reference", "lamp"], "--reference does not apply to compare"),
        (["--repair", "bn", "--repairs", "bn>naive@block+logits"], "--repair is the default of --repairs"),
        (["--budget", "0.9"], "unrecognized arguments: --budget"),  # no prefix of --budgets
        (["--out", "x"], "unrecognized arguments: --out"),  # no prefix of --out-dir
    ],
)
def test_compare_refuses_flags_it_would_ignore_or_guess(tmp_path, capsys, extra, words):
    args = ["compare", "--budgets", "0.8", *QUICK, "--out-dir", str(tmp_path / "c"), *extra]
    assert words in _refused(capsys, args) and not (tmp_path / "c").exists()


def test_split_selection_needs_selection_images(good, tmp_path, capsys):
    err = _refused(capsys, ["verify", "--plan", str(good), "--split", "selection", "--selection-size", "0"])
    assert "--selection-size is 0" in err
    args = ["compare", "--budgets", "0.9", "--split", "selection", "--selection-size", "0", "--out-dir", str(tmp_path)]
    assert "--selection-size is 0" in _refused(capsys, args)


def test_inputs_that_are_folders_or_pipes_are_named(tmp_path, capsys):
    assert "is a folder" in _refused(capsys, ["search", "--budget", "0.9", "--config", str(tmp_path) + "/"])
    args = ["search", "--budget", "0.9", "--model", "cifar_resnet20", "--checkpoint", str(tmp_path) + "/"]
    assert "is a folder" in _refused(capsys, args)
    r, w = os.pipe()
    try:
        err = _refused(capsys, ["verify", "--plan", f"/proc/self/fd/{r}"])
    finally:
        os.close(r)
        os.close(w)
    assert "named pipe" in err


@pytest.mark.parametrize("suffix", ["db", "log"])
def test_zero_trials_on_a_new_storage_leaves_no_file(tmp_path, capsys, suffix):
    path = tmp_path / f"new.{suffix}"
    storage = f"sqlite:///{path}" if suffix == "db" else str(path)
    args = ["search", "--budget", "0.9", "--allocator", "optuna", "--n-trials", "0", "--storage", storage, *QUICK]
    assert "no Optuna study" in _refused(capsys, [*args, "--out", str(tmp_path / "o" / "plan.json")])
    assert not path.exists() and not (tmp_path / "o").exists()


def test_an_error_after_a_progress_bar_starts_its_own_line(tmp_path):
    import subprocess

    code = (
        "import sys; from rr_alloc.system.progress import bar; from rr_alloc.cli import main\n"
        "b = bar(total=3, desc='x', disable=False); b.update(1); b.close()\n"
        "sys.exit(main(['search', '--budget', '2']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    assert any(line.startswith("error: ") for line in r.stderr.split("\n")), repr(r.stderr)


def test_a_cached_profile_of_the_wrong_shape_is_rebuilt(tmp_path, capsys, monkeypatch):
    from rr_alloc.profiling.store import ProfileCache

    monkeypatch.setenv("RR_ALLOC_CACHE", str(tmp_path / "cache"))
    args = ["search", "--budget", "0.9", "--allocator", "rr-greedy", "--no-verify", *QUICK]
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 0
    (entry,) = (tmp_path / "cache" / "profiles").glob("*.json")
    d = json.loads(entry.read_text())
    d["payload"]["d_raw"] = d["payload"]["d_raw"][:-1]  # one layer short, checksum made to match
    cache = ProfileCache(entry.parent)
    cache.put(entry.stem, d["payload"])
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "b.json")]) == 0
    assert "does not fit this run: rebuilding it" in capsys.readouterr().out


# ---------------------------------------------------------------- input that would be ignored
def test_search_flags_without_the_search_are_refused(tmp_path, capsys):
    assert "--search-repair" in _bad_search(tmp_path, capsys, "--budget", "0.9", "--search-repair", "bn")


def test_train_data_without_a_dataset_is_refused(tmp_path, capsys):
    assert "--dataset imagefolder" in _bad_search(tmp_path, capsys, "--budget", "0.9", "--train-data", str(tmp_path))


@pytest.mark.parametrize(
    "text,key", [("transform: {mean: [0.5], std: [0.5]}\n", "transform"), ("download: true\n", "download")]
)
def test_config_keys_the_built_in_digits_would_ignore_are_refused(tmp_path, capsys, text, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    err = _bad_search(tmp_path, capsys, "--budget", "0.9", "--config", str(cfg))
    assert f"config key {key!r} does not apply to the built-in digits" in err


@pytest.mark.parametrize(
    "text,words", [("budget: 0.5\n", "not a config key"), ("seed: 1\nseed: 2\n", "duplicate key 'seed'")]
)
def test_config_keys_that_would_be_ignored_are_refused(tmp_path, capsys, text, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert words in _bad_search(tmp_path, capsys, "--budget", "0.9", "--config", str(cfg))


# ------------------------------------------------------------------------------ models
def test_a_layer_that_never_runs_in_eval_mode_is_left_dense_and_named(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["search", "--budget", "0.8", "--model", "factories:aux_head_cnn", *QUICK, "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert "aux" not in [layer["name"] for layer in plan["layers"]]
    assert plan["source"]["left_dense"] == {"aux": "never runs in eval mode"}
    assert "left dense, never run in eval mode: aux" in capsys.readouterr().out


def test_the_default_repair_skips_what_a_model_lacks_and_still_plans(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["search", "--budget", "0.8", "--model", "factories:all_conv_net", *QUICK, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["verify"]["top1"] is not None
    notes = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(notes) == 1 and notes[0].startswith("note: repair step on block+logits skipped")


# ------------------------------------------------------------ inputs never become outputs
def test_search_refuses_to_write_over_its_checkpoint_config_or_images(tmp_path, capsys):
    from test_bad_input import _image_folder

    from rr_alloc.models import build_model

    ck = tmp_path / "ck.pt"
    torch.save(build_model("cifar_resnet20").state_dict(), ck)
    before = ck.read_bytes()
    err = _refused(
        capsys, ["search", "--budget", "0.9", "--model", "cifar_resnet20", "--checkpoint", str(ck), "--out", str(ck)]
    )
    assert "is the input" in err and ck.read_bytes() == before
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 1\n")
    assert "is the input" in _refused(capsys, ["search", "--budget", "0.9", "--config", str(cfg), "--out", str(cfg)])
    data = _image_folder(tmp_path / "data", per_class=2)
    args = [
        "search",
        "--budget",
        "0.9",
        "--model",
        "cifar_resnet20",
        "--dataset",
        "imagefolder",
        "--train-data",
        str(data),
        "--test-data",
        str(data),
        "--out",
        str(data / "class0" / "plan.json"),
    ]
    assert "inside the input folder" in _refused(capsys, args)


def test_apply_refuses_a_spec_file_that_is_the_plan(good, tmp_path, capsys):
    plan = tmp_path / "p.pt.repair.json"
    plan.write_text(good.read_text())
    before = plan.read_bytes()
    err = _refused(capsys, ["apply", "--plan", str(plan), "--out", str(tmp_path / "p.pt")])
    assert "is the input" in err and plan.read_bytes() == before


def test_replaying_refuses_config_keys_the_plan_decides(good, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text('pattern: "2:4"\n')
    assert "key 'pattern' does not apply" in _refused(capsys, ["verify", "--plan", str(good), "--config", str(cfg)])


def test_an_nm_plan_whose_counts_contradict_its_pattern_is_refused(tmp_path, capsys):
    plan = tmp_path / "nm.json"
    assert main(["search", "--pattern", "2:4", "--no-verify", *QUICK, "--out", str(plan)]) == 0
    d = json.loads(plan.read_text())
    layer = next(entry for entry in d["layers"] if entry["n_pruned"])
    layer["n_pruned"] -= 1
    layer["sparsity"] = layer["n_pruned"] / layer["n_weights"]
    total = sum(e["n_pruned"] for e in d["layers"]) / sum(e["n_weights"] for e in d["layers"])
    d["budget"] = d["achieved_sparsity"] = total
    plan.write_text(json.dumps(d))
    capsys.readouterr()
    assert "not what its pattern 2:4 prunes" in _refused(capsys, ["verify", "--plan", str(plan)])


def test_pretrained_for_a_zoo_model_without_weights_and_classes_for_the_digits_are_refused(tmp_path, capsys):
    assert "no downloadable weights" in _bad_search(
        tmp_path, capsys, "--budget", "0.9", "--model", "cifar_resnet20", "--pretrained"
    )
    assert "10 classes" in _bad_search(tmp_path, capsys, "--budget", "0.9", "--num-classes", "3")


def test_a_model_with_non_finite_outputs_is_refused(tmp_path, capsys):
    from rr_alloc.models import build_model

    sd = build_model("cifar_resnet20").state_dict()
    key = next(k for k in sd if k.endswith("running_var"))
    sd[key] = -torch.ones_like(sd[key])  # a negative variance: NaN after the first BatchNorm
    ck = tmp_path / "negvar.th"
    torch.save(sd, ck)
    err = _bad_search(
        tmp_path,
        capsys,
        "--budget",
        "0.9",
        "--model",
        "cifar_resnet20",
        "--checkpoint",
        str(ck),
        "--dataset",
        "imagefolder",
        "--train-data",
        str(_folder(tmp_path)),
        "--test-data",
        str(_folder(tmp_path)),
        "--calib-size",
        "4",
        "--selection-size",
        "2",
    )
    assert "non-finite outputs" in err


def _folder(tmp_path):
    from test_bad_input import _image_folder

    root = tmp_path / "imgs"
    return root if root.exists() else _image_folder(root, per_class=4)


@pytest.mark.parametrize("flag,pattern", [("--include", "layer3.*"), ("--exclude", "fc"), ("--exclude", "Linear")])
def test_a_layer_pattern_that_matches_no_layer_is_refused_naming_it(tmp_path, capsys, flag, pattern):
    err = _bad_search(tmp_path, capsys, "--budget", "0.9", *QUICK, flag, "layer1.*", pattern)
    assert f"{flag} pattern {pattern!r} (" in err and "matches no prunable layer" in err and "layer1.0.conv1" in err


@pytest.fixture(scope="module")
def nm_plan(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nm") / "plan.json"
    assert main(["search", "--pattern", "2:4", "--no-verify", *QUICK, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("fmt", ["torch-prune", "torch-pruning", "sparseml", "nni", "nni-v2"])
def test_an_nm_plan_is_not_exported_as_unstructured_fractions(nm_plan, tmp_path, capsys, fmt):
    out = tmp_path / "out.txt"
    err = _refused(capsys, ["export", "--plan", str(nm_plan), "--format", fmt, "--out", str(out)])
    assert f"--format {fmt} has no N:M form" in err and "masks" in err and not out.exists()


def test_an_nm_plan_exports_its_pattern_and_exact_masks(nm_plan, tmp_path, capsys):
    import yaml

    from rr_alloc.models import build_model
    from rr_alloc.plans.plan import Plan

    recipe = tmp_path / "recipe.yaml"
    assert main(["export", "--plan", str(nm_plan), "--format", "llm-compressor", "--out", str(recipe)]) == 0
    text = recipe.read_text()
    body = yaml.safe_load(text)["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    assert body["mask_structure"] == "2:4" and "other groups" in text
    dense = [l.name for l in Plan.load(nm_plan).layers if l.n_pruned == 0]  # conv1: one input channel
    assert dense and not set(dense) & set(body["targets"]) and f"not targeted: {dense[0]}" in text
    assert len(body["targets"]) == len(body["sparsity"])
    masks = tmp_path / "masks.pt"
    assert main(["export", "--plan", str(nm_plan), "--format", "masks", "--out", str(masks)]) == 0
    plan, saved = Plan.load(nm_plan), torch.load(masks, weights_only=True)
    want = plan.pruning().keep_masks(build_model("digits_resnet"))
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k].cpu()) for k in saved)
    assert all(int((~saved[k]).sum()) == plan.counts[k] for k in saved)
    assert all(plan.counts[k] == 0 for k in plan.counts.keys() - saved.keys())  # inputs not a multiple of 4
