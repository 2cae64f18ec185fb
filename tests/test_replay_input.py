"""verify, apply and export refuse what a plan file or its flags get wrong, in one ``error:`` line: flags the
plan decides, edited totals, plan-named code, tampered layers and checkpoints, outputs that are inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    EVIL_FACTORY,
    EXPORT_FORMATS,
    QUICK,
    REPLAY_CMDS,
    copy_plan,
    one_error,
    payloads,
    refused,
    replay_argv,
    simple_plan,
    strict_json,
    unwritable,
    with_model,
)

from rr_alloc.cli import main


# -------------------------------------------------------------- a plan decides what it is
@pytest.mark.parametrize("cmd", ["verify", "apply", "export"])
def test_replaying_commands_refuse_flags_the_plan_decides(good, tmp_path, capsys, cmd):
    extra = {"apply": ["--out", str(tmp_path / "p.pt")], "export": ["--format", "csv", "--out", str(tmp_path / "x")]}
    err = refused(capsys, [cmd, "--plan", str(good), "--pattern", "2:4", *extra.get(cmd, [])])
    assert "--pattern" in err
    assert "--n-trials" in refused(capsys, [cmd, "--plan", str(good), "--n-trials", "3", *extra.get(cmd, [])])
    assert not list(tmp_path.iterdir())


def test_plan_totals_must_agree_with_its_layers(good, tmp_path, capsys):
    err = refused(capsys, ["verify", "--plan", str(copy_plan(good, tmp_path, achieved_sparsity=0.1))])
    assert "achieved_sparsity 0.1 contradicts its layers" in err
    err = refused(capsys, ["verify", "--plan", str(copy_plan(good, tmp_path, budget=0.5))])
    assert "budget 0.5 contradicts its layers" in err


def test_plan_numbers_too_large_or_empty_layers_are_one_line(good, tmp_path, capsys):
    text = good.read_text().replace('"n_weights": 144', '"n_weights": 1e400', 1)
    (tmp_path / "big.json").write_text(text)
    assert "n_weights" in refused(capsys, ["verify", "--plan", str(tmp_path / "big.json")])
    d = json.loads(good.read_text())
    d["layers"][0].update(n_weights=0, n_pruned=0, sparsity=0.0)
    (tmp_path / "zero.json").write_text(json.dumps(d))
    err = refused(capsys, ["verify", "--plan", str(tmp_path / "zero.json")])
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


# ------------------------------------------------------------------- good files are kept
@pytest.mark.parametrize("cmd", ["apply", "export"])
def test_an_output_that_is_the_input_plan_is_refused(good, tmp_path, capsys, cmd):
    plan = tmp_path / "plan.json"
    plan.write_text(good.read_text())
    before = plan.read_bytes()
    extra = ["--format", "csv"] if cmd == "export" else []
    err = refused(capsys, [cmd, "--plan", str(plan), *extra, "--out", str(plan)])
    assert "is the input" in err and plan.read_bytes() == before


def test_outputs_that_are_links_devices_or_another_output_are_refused(good, tmp_path, capsys):
    link = tmp_path / "link.json"
    link.symlink_to(good)
    assert "symbolic link" in refused(capsys, ["search", "--budget", "0.9", "--out", str(link)])
    assert "symbolic link" in refused(capsys, ["search", "--budget", "0.9", "--out", "/proc/self/fd/1"])
    assert "character device" in refused(capsys, ["search", "--budget", "0.9", "--out", "/dev/null"])
    err = refused(capsys, ["search", "--budget", "0.9", "--out", str(tmp_path / "r" / "profile.csv")])
    assert "another file" in err
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "profile.csv").mkdir()
    assert "not a regular file" in refused(
        capsys, ["search", "--budget", "0.9", "--out", str(tmp_path / "s" / "p.json")]
    )
    assert link.resolve() == good.resolve()


def test_split_selection_needs_selection_images(good, tmp_path, capsys):
    err = refused(capsys, ["verify", "--plan", str(good), "--split", "selection", "--selection-size", "0"])
    assert "--selection-size is 0" in err
    args = ["compare", "--budgets", "0.9", "--split", "selection", "--selection-size", "0", "--out-dir", str(tmp_path)]
    assert "--selection-size is 0" in refused(capsys, args)


def test_apply_refuses_a_spec_file_that_is_the_plan(good, tmp_path, capsys):
    plan = tmp_path / "p.pt.repair.json"
    plan.write_text(good.read_text())
    before = plan.read_bytes()
    err = refused(capsys, ["apply", "--plan", str(plan), "--out", str(tmp_path / "p.pt")])
    assert "is the input" in err and plan.read_bytes() == before


def test_replaying_refuses_config_keys_the_plan_decides(good, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text('pattern: "2:4"\n')
    assert "key 'pattern' does not apply" in refused(capsys, ["verify", "--plan", str(good), "--config", str(cfg)])


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
    assert "not what its pattern 2:4 prunes" in refused(capsys, ["verify", "--plan", str(plan)])


@pytest.mark.parametrize("fmt", ["torch-prune", "torch-pruning", "sparseml", "nni", "nni-v2"])
def test_an_nm_plan_is_not_exported_as_unstructured_fractions(nm_plan, tmp_path, capsys, fmt):
    out = tmp_path / "out.txt"
    err = refused(capsys, ["export", "--plan", str(nm_plan), "--format", fmt, "--out", str(out)])
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


@pytest.mark.parametrize("spec", ["evil_plan_mod:factory", "tempfile:mkdtemp", "this:x", "os:system"])
@pytest.mark.parametrize("cmd", REPLAY_CMDS)
def test_plan_model_code_is_refused(tmp_path, capsys, monkeypatch, factory_plan, spec, cmd):
    import tempfile

    marker = tmp_path / "executed"
    (tmp_path / "evil_plan_mod.py").write_text(EVIL_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("RR_EVIL_MARKER", str(marker))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdirs"))  # where mkdtemp would create a folder
    (tmp_path / "tmpdirs").mkdir()
    had_this = "this" in sys.modules
    plan = with_model(factory_plan, spec, tmp_path / "plan.json")
    out = tmp_path / "out" / "result"
    err = one_error(capsys, main(replay_argv(cmd, plan, out)))
    assert spec in err and "--trust-plan-model" in err and "--model" in err
    assert not out.exists() and not out.parent.exists()
    assert not marker.exists() and not Path(str(marker) + ".called").exists()  # nothing imported or called
    assert "evil_plan_mod" not in sys.modules and ("this" in sys.modules) == had_this
    assert not list((tmp_path / "tmpdirs").iterdir())


@pytest.mark.parametrize("how", ["cli-model", "trust-flag"])
def test_plan_model_code_runs_when_the_caller_says_so(tmp_path, capsys, factory_plan, how):
    extra = ["--model", "factories:tiny_digits_cnn"] if how == "cli-model" else ["--trust-plan-model"]
    out = tmp_path / "masks.pt"
    assert main(replay_argv("export:masks", factory_plan, out, *extra)) == 0, capsys.readouterr().err
    assert out.exists()


@pytest.mark.parametrize("model", ["digits_resnet", "torchvision:resnet18", "resnet18"])
def test_zoo_and_torchvision_names_need_no_trust(tmp_path, capsys, model):
    from rr_alloc.plans.replay import check_plan_model

    plan = simple_plan(model=model)
    check_plan_model(plan, model, None, False)  # no error: these names import no user code
    with pytest.raises(Exception, match="trust-plan-model"):
        check_plan_model(simple_plan(model="pkg.mod:f"), "pkg.mod:f", None, False)
    check_plan_model(simple_plan(model="pkg.mod:f"), "pkg.mod:f", "pkg.mod:f", False)
    check_plan_model(simple_plan(model="pkg.mod:f"), "digits_resnet", "digits_resnet", False)  # overridden


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
@pytest.mark.parametrize("tamper", ["unknown-layer", "wrong-shape", "checkpoint-changed"])
def test_every_export_checks_layers_and_checkpoint(tmp_path, capsys, checkpoint_plan, fmt, tamper):
    import json
    import shutil

    plan_path, ck0 = checkpoint_plan
    ck = tmp_path / "ck.pt"
    shutil.copy(ck0, ck)
    d = json.loads(plan_path.read_text())
    d["source"]["checkpoint"] = str(ck)
    if tamper == "unknown-layer":
        d["layers"][0]["name"] = "no_such_layer"
    elif tamper == "wrong-shape":
        d["layers"][0]["shape"] = [1, 2, 3, 4]
    else:
        sd = torch.load(ck, weights_only=True)
        k = next(iter(sd))
        sd[k] = sd[k] + 1
        torch.save(sd, ck)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(d))
    out = tmp_path / "out" / "exported"
    err = one_error(capsys, main(["export", "--plan", str(plan), "--format", fmt, "--out", str(out)]))
    assert {"unknown-layer": "no_such_layer", "wrong-shape": "shape", "checkpoint-changed": "SHA-256"}[tamper] in err
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("where", ["under-file", "under-proc", "existing-dir"])
@pytest.mark.parametrize("cmd", ["search", "apply", "export", "compare"])
def test_unwritable_output_fails_before_work(tmp_path, capsys, checkpoint_plan, cmd, where):
    if where == "existing-dir":
        if cmd == "search":
            pytest.skip("search writes DIR/plan.json into an existing folder (tested below)")
        target = tmp_path / "exists"
        target.mkdir()
        if cmd == "compare":  # an output folder that is a file
            target = tmp_path / "exists_file"
            target.write_text("x")
    else:
        target = unwritable(tmp_path, where)
    before = sorted(tmp_path.rglob("*"))
    argv = {
        "search": ["search", "--budget", "0.9", "--out", str(target)],
        "apply": ["apply", "--plan", str(checkpoint_plan[0]), "--out", str(target)],
        "export": ["export", "--plan", str(checkpoint_plan[0]), "--format", "csv", "--out", str(target)],
        "compare": ["compare", "--budgets", "0.9", "--allocators", "uniform", "--out-dir", str(target)],
    }[cmd]
    code = main(argv)
    out = capsys.readouterr()
    assert out.out == ""  # refused before any work
    err = out.err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert ("--out-dir" if cmd == "compare" else "--out") in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, probes removed


@pytest.mark.parametrize(
    "field,value", [("calib_size", "abc"), ("seed", [1, 2]), ("batch_size", 0), ("eval_size", "all")]
)
@pytest.mark.parametrize("cmd", ["verify", "apply", "export:csv"])
def test_plan_values_are_type_checked(tmp_path, capsys, checkpoint_plan, field, value, cmd):
    import json

    d = json.loads(checkpoint_plan[0].read_text())
    if field == "batch_size":
        d["source"][field] = value
    else:
        d["source"]["data"][field] = value
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(d))
    out = tmp_path / "out" / "result"
    err = one_error(capsys, main(replay_argv(cmd, plan, out)))
    assert field in err and not out.parent.exists()


@pytest.mark.parametrize("payload", ["newline", "cr", "u2028", "yaml-key"])
@pytest.mark.parametrize("field", ["allocator", "model", "budget_unit", "layer"])
def test_plan_with_control_characters_is_refused_at_load(tmp_path, capsys, field, payload):
    marker = tmp_path / "executed"
    plan = tmp_path / "plan.json"
    simple_plan(**{field: payloads(marker)[payload]}).save(plan)
    for fmt in ("torch-prune", "sparseml"):
        out = tmp_path / f"out_{fmt}"
        err = one_error(capsys, main(["export", "--plan", str(plan), "--format", fmt, "--out", str(out)]))
        assert "control character" in err or "budget_unit" in err
        assert not out.exists() and not marker.exists()


@pytest.mark.parametrize("payload", ["newline", "cr", "u2028", "docstring", "yaml-key"])
@pytest.mark.parametrize("fmt", ["torch-prune", "torch-pruning", "llm-compressor", "sparseml"])
def test_export_quotes_plan_strings(tmp_path, fmt, payload):
    import runpy

    import yaml

    from rr_alloc.plans.export import export_plan

    marker = tmp_path / "executed"
    bad = payloads(marker)[payload]
    plan = simple_plan(allocator=bad, model=bad, budget_unit=bad, layer=bad)
    names = [l.name for l in plan.layers]
    out = export_plan(plan, fmt, tmp_path / ("gen.py" if fmt.startswith("torch") else "gen.yaml"))
    text = out.read_text()
    if fmt.startswith("torch"):
        mod = runpy.run_path(str(out))  # importing the generated module runs nothing from the plan
        assert not marker.exists()
        if fmt == "torch-prune":
            assert list(mod["COUNTS"]) == names
        else:
            assert list(mod["CHANNEL_RATIOS"]) == names[:-1] and mod["IGNORED"] == names[-1:]
        return
    assert not any(l.startswith(("injected", "modifiers: []")) for l in text.splitlines())

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor(
        "!GMPruningModifier", lambda l, node: {"GMPruningModifier": l.construct_mapping(node, deep=True)}
    )
    doc = yaml.load(text, Loader=Loader)
    if fmt == "llm-compressor":
        assert list(doc) == ["sparsity_stage"]
        assert doc["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]["targets"] == names
    else:
        assert list(doc) == ["modifiers"] and len(doc["modifiers"]) == 1
        gm = doc["modifiers"][0]["GMPruningModifier"]
        assert sorted(p for ps in gm["final_sparsity"].values() for p in ps) == sorted(f"{n}.weight" for n in names)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_plan_never_writes_nan(tmp_path, bad):
    from rr_alloc.plans.plan import LayerPlan, Plan

    plan = Plan(
        [LayerPlan("fc", 5, 10, (2, 5))],
        0.5,
        "global",
        "bn",
        verify={"top1": bad, "kl": bad, "reference": {"kl": bad, "agreement": 0.5}},
        profile={"grid": [0.5, bad]},
    )
    text = plan.save(tmp_path / "plan.json").read_text()
    d = strict_json(text)
    assert d["verify"] == {"top1": None, "kl": None, "reference": {"kl": None, "agreement": 0.5}}
    assert d["profile"]["grid"] == [0.5, None]
    assert Plan.load(tmp_path / "plan.json").layers[0].n_pruned == 5
