"""Exports round-trip through the real consumers (or their documented structure)."""

from __future__ import annotations

import json
import runpy

import numpy as np
import pytest
import torch
import yaml

from rr_alloc.cli import main
from rr_alloc.models import build_model
from rr_alloc.nn.layers import prunable_layers
from rr_alloc.plans.export import EXPORTERS, export_plan, weight_to_channel_ratio
from rr_alloc.plans.plan import LayerPlan, Plan


def _plan_for(model, seed=0, low=0.3, high=0.95) -> Plan:
    rng = np.random.default_rng(seed)
    layers = [
        LayerPlan(l.name, int(rng.uniform(low, high) * l.n_weights), l.n_weights, l.shape)
        for l in prunable_layers(model)
    ]
    return Plan(layers, 0.8, "test", "bn", source={"model": "cifar_resnet20"})


@pytest.fixture
def resnet20():
    torch.manual_seed(0)
    return build_model("cifar_resnet20").eval()


def test_torch_prune_export_gives_exact_counts(resnet20, tmp_path):
    plan = _plan_for(resnet20)
    path = export_plan(plan, "torch-prune", tmp_path / "apply_plan.py")
    mod = runpy.run_path(str(path))
    mod["apply"](resnet20)
    for l in plan.layers:
        w = resnet20.get_submodule(l.name).weight
        assert int((w == 0).sum()) == l.n_pruned, l.name
        assert not hasattr(resnet20.get_submodule(l.name), "weight_orig")  # masks made permanent
    with pytest.raises(RuntimeError, match="already pruned"):  # no silent compounding
        import torch.nn.utils.prune as prune

        prune.identity(resnet20.conv1, "weight")
        mod["apply"](resnet20)


def test_torch_pruning_export_runs_with_the_real_package(resnet20, tmp_path, capsys):
    pytest.importorskip("torch_pruning")
    plan = _plan_for(resnet20, low=0.2, high=0.6)
    path = export_plan(plan, "torch-pruning", tmp_path / "tp_plan.py", model=resnet20)
    mod = runpy.run_path(str(path))
    # block-internal convs get ratios; the stem, every conv2 (residual stream) and the classifier are ignored
    assert set(mod["CHANNEL_RATIOS"]) == {l.name for l in plan.layers if l.name.endswith(".conv1")}
    assert "conv1" in mod["IGNORED"] and "layer3.2.conv2" in mod["IGNORED"] and "linear" in mod["IGNORED"]
    before = {l.name: l.n_weights for l in plan.layers}
    out_before = {l.name: resnet20.get_submodule(l.name).weight.shape[0] for l in plan.layers}
    mod["prune"](resnet20, torch.randn(1, 3, 32, 32))
    out = resnet20(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    # report realised weight reduction per layer against the plan (channel pruning differs by design)
    rows = []
    for l in plan.layers:
        kept = resnet20.get_submodule(l.name).weight.numel()
        rows.append((l.name, l.sparsity, 1 - kept / before[l.name]))
    # each ratio-bearing layer lost its planned share of output channels; ignored layers kept all of theirs
    for name, r in mod["CHANNEL_RATIOS"].items():
        got = resnet20.get_submodule(name).weight.shape[0]
        assert abs(got - (1 - r) * out_before[name]) <= 1, name
    for name in mod["IGNORED"]:
        assert resnet20.get_submodule(name).weight.shape[0] == out_before[name], name
    with capsys.disabled():
        print("\nTorch-Pruning export on CIFAR ResNet-20: layer, planned weight sparsity, realised")
        for name, want, got in rows:
            print(f"  {name:<16} {want:.3f} {got:.3f}")
    assert weight_to_channel_ratio(0.75) == pytest.approx(0.5)


def test_llm_compressor_recipe_structure(resnet20, tmp_path):
    plan = _plan_for(resnet20)
    text = export_plan(plan, "llm-compressor", tmp_path / "recipe.yaml").read_text()
    mod = yaml.safe_load(text)["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    names = [n for n, m in resnet20.named_modules() if n in {l.name for l in plan.layers}]
    assert mod["targets"] == names  # named_modules order
    assert len(mod["sparsity"]) == len(mod["targets"])
    np.testing.assert_allclose(mod["sparsity"], [l.sparsity for l in plan.layers], atol=1e-6)
    assert mod["mask_structure"] == "0:0"


def test_sparseml_recipe_structure(resnet20, tmp_path):
    plan = _plan_for(resnet20)
    text = export_plan(plan, "sparseml", tmp_path / "recipe.yaml").read_text()

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor(
        "!GMPruningModifier", lambda l, node: {"GMPruningModifier": l.construct_mapping(node, deep=True)}
    )
    mods = yaml.load(text, Loader=Loader)["modifiers"]
    gm = mods[0]["GMPruningModifier"]
    got = {p: s for s, params in gm["final_sparsity"].items() for p in params}
    assert got == {f"{l.name}.weight": pytest.approx(l.sparsity, abs=1e-6) for l in plan.layers if l.n_pruned}
    assert gm["mask_type"] == "unstructured" and gm["params"] == []
    assert 0 < gm["init_sparsity"] <= min(got.values())


def test_sparseml_leaves_a_layer_the_plan_keeps_dense_out_of_its_targets(resnet20, tmp_path):
    plan = _plan_for(resnet20)
    plan.layers[0] = LayerPlan(plan.layers[0].name, 0, plan.layers[0].n_weights, plan.layers[0].shape)
    text = export_plan(plan, "sparseml", tmp_path / "recipe.yaml").read_text()
    assert f"# left dense, not targeted: {plan.layers[0].name}" in text
    assert f"- {plan.layers[0].name}.weight" not in text


@pytest.mark.parametrize("fmt,key", [("nni", "sparse_ratio"), ("nni-v2", "sparsity_per_layer")])
def test_nni_config_list(resnet20, tmp_path, fmt, key):
    plan = _plan_for(resnet20)
    cfg = json.loads(export_plan(plan, fmt, tmp_path / "nni.json").read_text())
    assert [c["op_names"] for c in cfg] == [[l.name] for l in plan.layers]
    np.testing.assert_allclose([c[key] for c in cfg], [l.sparsity for l in plan.layers], atol=1e-6)


def test_csv_and_markdown(resnet20, tmp_path):
    import pandas as pd

    plan = _plan_for(resnet20)
    df = pd.read_csv(export_plan(plan, "csv", tmp_path / "p.csv"))
    assert list(df.name) == [l.name for l in plan.layers] and list(df.n_pruned) == [l.n_pruned for l in plan.layers]
    md = export_plan(plan, "markdown", tmp_path / "p.md").read_text()
    assert all(f"`{l.name}`" in md for l in plan.layers)


@pytest.fixture(scope="module")
def digits_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "plan.json"
    assert main(["search", "--budget", "0.85", "--out", str(out)]) == 0
    return out


def test_masks_export_matches_plan(digits_plan, tmp_path):
    assert main(["export", "--plan", str(digits_plan), "--format", "masks", "--out", str(tmp_path / "m.pt")]) == 0
    masks = torch.load(tmp_path / "m.pt", weights_only=True)
    plan = Plan.load(digits_plan)
    for l in plan.layers:
        assert masks[l.name].dtype == torch.bool and int((~masks[l.name]).sum()) == l.n_pruned


def test_apply_reload_gives_verified_top1(digits_plan, tmp_path, capsys):
    from rr_alloc import load_pruned
    from rr_alloc.data.splits import DataSpec, load_splits
    from rr_alloc.models.digits import DigitsResNet

    out = tmp_path / "pruned.pt"
    assert main(["apply", "--plan", str(digits_plan), "--out", str(out)]) == 0
    plan = Plan.load(digits_plan)
    model = load_pruned(DigitsResNet(), out)  # a fresh, unmodified instance
    spec = DataSpec.from_dict(plan.source["data"])
    test = load_splits(spec).test
    with torch.no_grad():
        top1 = float(sum((model(x).argmax(1) == y).sum() for x, y in test)) / test.n
    assert top1 == pytest.approx(plan.verify["top1"], abs=1e-9)
    for l in plan.layers:
        assert int((model.get_submodule(l.name).weight == 0).sum()) >= l.n_pruned


def test_apply_refuses_changed_checkpoint(tmp_path, capsys):
    from rr_alloc.models.digits import pretrained_digits_resnet

    ck = tmp_path / "ck.pt"
    torch.save(pretrained_digits_resnet().state_dict(), ck)
    plan_path = tmp_path / "plan.json"
    assert main(["search", "--budget", "0.5", "--checkpoint", str(ck), "--out", str(plan_path), "--no-verify"]) == 0
    sd = torch.load(ck, weights_only=True)
    sd["conv1.weight"] += 1.0
    torch.save(sd, ck)
    capsys.readouterr()
    assert main(["apply", "--plan", str(plan_path), "--out", str(tmp_path / "o.pt")]) == 2
    assert "changed since the plan was made" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_unknown_format(digits_plan, tmp_path, capsys):
    assert main(["export", "--plan", str(digits_plan), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "unknown export format" in capsys.readouterr().err
    assert set(EXPORTERS) >= {"torch-prune", "torch-pruning", "llm-compressor", "sparseml", "nni", "csv", "markdown"}


def test_apply_torchscript(digits_plan, tmp_path):
    out = tmp_path / "pruned.ts"
    assert main(["apply", "--plan", str(digits_plan), "--out", str(out), "--format", "torchscript"]) == 0
    m = torch.jit.load(str(out))
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_a_moved_checkpoint_replays_and_other_weights_are_refused(tmp_path, capsys):
    from rr_alloc.models.digits import pretrained_digits_resnet

    ck = tmp_path / "ck.pt"
    torch.save(pretrained_digits_resnet().state_dict(), ck)
    plan_path = tmp_path / "plan.json"
    assert main(["search", "--budget", "0.5", "--checkpoint", str(ck), "--out", str(plan_path), "--no-verify"]) == 0
    moved = tmp_path / "moved.pt"
    ck.rename(moved)
    csv = tmp_path / "plan.csv"
    export = ["export", "--plan", str(plan_path), "--format", "csv", "--checkpoint", str(moved), "--out", str(csv)]
    assert main(export) == 0
    sd = torch.load(moved, weights_only=True)
    sd["conv1.weight"] += 1.0
    other = tmp_path / "other.pt"
    torch.save(sd, other)
    capsys.readouterr()
    out = tmp_path / "o.pt"
    assert main(["apply", "--plan", str(plan_path), "--checkpoint", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {other} is not the one the plan was made from" in err and not out.exists()
