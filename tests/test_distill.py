"""The kd repair step: exact masks, determinism, lower KL, composition, replays and its options."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from test_cli import run_cli

from rr_alloc.errors import UserError
from rr_alloc.nn.layers import prunable_layers
from rr_alloc.nn.pruning import apply_masks, masks_for_plan, n_pruned, nm_mask, nm_masks
from rr_alloc.repair import DistillStep, RepairPipeline, distill, run_repair


def _images(n: int = 48, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _masks(model, s: float = 0.8) -> dict[str, torch.Tensor]:
    return masks_for_plan(model, {l.name: n_pruned(s, l.n_weights) for l in prunable_layers(model)})


def _kl(dense, model, x) -> float:
    with torch.no_grad():
        t, s = dense.eval()(x), model.eval()(x)
    return float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean"))


def _pruned(toy, masks):
    p = copy.deepcopy(toy)
    apply_masks(p, masks)
    return p


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_pruned_weights_stay_exactly_zero_and_counts_exact(toy, nm):
    if nm is None:
        masks = _masks(toy)
    else:  # N:M groups along the input channels of every layer whose inputs are a multiple of 4
        masks = nm_masks(toy, [l.name for l in prunable_layers(toy)], *nm)
    pruned = _pruned(toy, masks)
    distill(pruned, toy, _images(), DistillStep(steps=15, lr=1e-2, batch=16, params="all"), masks)
    for name, mask in masks.items():
        w = pruned.get_submodule(name).weight
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
        assert int((w != 0).sum()) == int(mask.sum())  # every kept weight stays kept (counts exact)
        if nm is not None:
            torch.testing.assert_close(nm_mask(w, *nm), mask)  # the N:M groups are unchanged
    assert all(p.grad is None for p in pruned.parameters())
    assert not any(h for m in pruned.modules() for h in (m._forward_hooks, m._forward_pre_hooks))


def test_same_seed_same_weights_other_seed_other_weights(toy):
    masks = _masks(toy)
    runs = []
    for seed in (0, 0, 1):
        p = _pruned(toy, masks)
        distill(p, toy, _images(), DistillStep(steps=10, lr=1e-2, batch=8), masks, seed=seed)
        runs.append(torch.cat([t.flatten() for t in p.state_dict().values() if t.is_floating_point()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("loss", ["kl", "block", "kl+block"])
def test_the_step_lowers_the_kl_to_the_dense_model_on_its_images(toy, loss):
    with torch.no_grad():
        toy.fc.weight.mul_(20)  # confident outputs: a KL worth lowering
    masks = _masks(toy, 0.7)
    x = _images(64)
    pruned = _pruned(toy, masks)
    before = _kl(toy, pruned, x)
    distill(pruned, toy, x, DistillStep(steps=60, lr=3e-3, batch=32, loss=loss, aug="none"), masks)
    assert _kl(toy, pruned, x) < 0.8 * before


def test_it_composes_in_a_pipeline_and_reports_its_settings(toy, toy_batches):
    masks = _masks(toy)
    pruned = _pruned(toy, masks)
    report = run_repair(pruned, "obs>bn>kd:steps=5:lr=0.001>naive@block", toy_batches, dense=toy, masks=masks)
    assert report.distill["steps"] == 5 and report.distill["lr"] == 0.001 and report.distill["images"] == 36
    assert report.plan_fields()["repair_distill"]["loss"] == "kl+block"  # the default
    for name, mask in report.masks.items():  # the masks obs chose are the ones kd kept
        assert int((pruned.get_submodule(name).weight != 0).sum()) == int(mask.sum())


def test_text_form_round_trips_and_records_only_what_differs():
    pipe = RepairPipeline.parse("obs>bn>naive@block+logits>kd:lr=0.0003:loss=kl:aug=flip")
    assert str(pipe) == "obs>bn>naive@block+logits>kd:lr=0.0003:loss=kl:aug=flip"
    assert str(RepairPipeline.parse(str(pipe))) == str(pipe)
    assert str(RepairPipeline.parse("kd")) == "kd" and pipe.reconstructs


@pytest.mark.parametrize(
    "text, words",
    [
        ("kd:lr=nan", "lr a number in (0, 1]"),
        ("kd:lr=-1", "lr a number in (0, 1]"),
        ("kd:lr=inf", "lr a number in (0, 1]"),
        ("kd:steps=0", "positive integers"),
        ("kd:batch=1.5", "positive integers"),
        ("kd:loss=mse", "loss one of kl, block, kl+block"),
        ("kd:aug=rotate", "aug one of"),
        ("kd:steps=5:steps=6", "given twice"),
        ("kd:epochs=3", "unknown option 'epochs=3'"),
        ("kd:lr", "unknown option 'lr'"),
    ],
)
def test_bad_step_options_are_one_line(text, words):
    with pytest.raises(UserError) as e:
        RepairPipeline.parse(text)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_plan_with_the_step_replays_through_verify_and_apply_to_the_same_metrics(tmp_path):
    out = tmp_path / "plan.json"
    repair = "obs>bn>naive@block+logits>kd:steps=20"
    argv = ("search", "--budget", "0.9", "--allocator", "global", "--repair", repair, "--distill-size", "600")
    r = run_cli(*argv, "--out", str(out))
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    assert plan["repair"] == repair and plan["verify"]["repair_distill"]["images"] == 600
    assert plan["source"]["data"]["distill_size"] == 600 and plan["calibration"]["distill_size"] == 600
    v = run_cli("verify", "--plan", str(out))
    assert v.returncode == 0, v.stderr

    def row(out: str) -> list[str]:
        return next(l.split() for l in out.splitlines() if l.strip().startswith("global + repair"))

    assert row(r.stdout) == row(v.stdout)  # the same metrics, to the printed digit
    pruned = tmp_path / "pruned.pt"
    a = run_cli("apply", "--plan", str(out), "--out", str(pruned))
    assert a.returncode == 0, a.stderr
    e = run_cli("export", "--plan", str(out), "--format", "masks", "--out", str(tmp_path / "masks.pt"))
    assert e.returncode == 0, e.stderr
    assert "the weights" in e.stdout + e.stderr  # masks alone do not carry the distilled weights


@pytest.mark.parametrize(
    "args, words",
    [
        (["--distill-size", "600"], "--distill-size applies to the kd repair step"),
        (["--repair", "kd", "--distill-size", "100"], "is below the 512 calibration images"),
        (["--repair", "kd", "--distill-size", "5000"], "exceed the 1400 training images"),
    ],
)
def test_bad_distill_sizes_are_one_line(tmp_path, args, words):
    out = tmp_path / "p" / "plan.json"
    r = run_cli("search", "--budget", "0.9", *args, "--out", str(out))
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
