"""Repair: BN recalibration, closed-form scales, folding, sites and N:M masks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rr_alloc.errors import UserError
from rr_alloc.nn.layers import prunable_layers
from rr_alloc.nn.pruning import apply_masks, magnitude_mask, masks_for_plan, n_pruned, nm_mask
from rr_alloc.nn.stats import repair_gamma
from rr_alloc.repair import (
    RepairPipeline,
    affine_modules,
    discover_sites,
    fold_correction,
    recalibrate_bn,
    run_repair,
    site_moments,
)


def _pruned(model, s=0.8):
    p = copy.deepcopy(model)
    apply_masks(p, masks_for_plan(p, {l.name: n_pruned(s, l.n_weights) for l in prunable_layers(p)}))
    return p


def _out(model, batches):
    with torch.no_grad():
        return torch.cat([model.eval()(x) for x, _ in batches])


def test_bn_recalibration_is_idempotent(toy, toy_batches):
    p = _pruned(toy)
    recalibrate_bn(p, toy_batches)
    first = {k: v.clone() for k, v in p.state_dict().items()}
    recalibrate_bn(p, toy_batches)
    for k, v in p.state_dict().items():
        if "num_batches_tracked" not in k:
            torch.testing.assert_close(v, first[k], rtol=1e-6, atol=1e-7)
    assert not p.training and all(not m.training for m in p.modules())
    assert all(m.momentum == 0.1 for m in p.modules() if isinstance(m, nn.BatchNorm2d))


def test_hand_computed_scales():
    v_d = torch.tensor([4.0, 1.0, 9.0])
    v_p = torch.tensor([1.0, 1.0, 0.0])  # third channel dead
    lw = repair_gamma(v_d, v_p, "lw")
    # LW ignores the dead channel: sqrt((4+1)/(1+1))
    torch.testing.assert_close(lw, torch.full((3,), (5 / 2) ** 0.5, dtype=torch.float64))
    naive = repair_gamma(v_d, v_p, "naive")
    torch.testing.assert_close(naive, torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
    # ASR, lambda = mean of live v_p over all channels = (1+1+0)/3
    lam = 2 / 3
    s = 1 / (1 + lam)
    asr = repair_gamma(v_d, v_p, "asr", "mean")
    torch.testing.assert_close(asr, torch.tensor([s * 2 + (1 - s), 1.0, 1.0], dtype=torch.float64))


def test_asr_limits():
    g = torch.Generator().manual_seed(0)
    v_d = torch.rand(16, generator=g) + 0.1
    v_p = torch.rand(16, generator=g) + 0.1
    torch.testing.assert_close(repair_gamma(v_d, v_p, "asr", 1e-12), repair_gamma(v_d, v_p, "naive"))
    torch.testing.assert_close(repair_gamma(v_d, v_p, "asr", 1e12), torch.ones(16, dtype=torch.float64))


@pytest.mark.parametrize("shift", [True, False])
def test_asr_lambda_infinite_is_identity_or_mean_shift(toy, toy_batches, shift):
    p = _pruned(toy)
    ref = copy.deepcopy(p)
    opt = "" if shift else ":noshift"
    run_repair(p, f"asr@logits:lam=1e12{opt}", toy_batches, dense=toy)
    out, base = _out(p, toy_batches), _out(ref, toy_batches)
    if shift:  # only the mean moves, onto the dense mean
        dense = _out(toy, toy_batches)
        torch.testing.assert_close(out - out.mean(0), base - base.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.mean(0), dense.mean(0), rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "bn", "block", "logits"])
def test_folding_equals_hook_reference(toy, toy_batches, kind):
    p = _pruned(toy)
    sites = discover_sites(toy, (kind,))
    g = torch.Generator().manual_seed(3)
    folded, hooked = copy.deepcopy(p), copy.deepcopy(p)
    handles = []
    for site in sites:
        c = hooked.get_submodule(site.name)
        C = (
            c.weight.shape[0]
            if hasattr(c, "weight") and c.weight is not None
            else site_moments(hooked, [site], toy_batches[:1])[site.name].mean.numel()
        )
        scale, shift = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
        fold_correction(folded, site.name, site.kind, scale, shift, site.consumer_bn, site.channel_dim)

        def hook(m, i, o, sc=scale, sh=shift, d=site.channel_dim):
            shape = [1] * o.dim()
            shape[d] = -1
            return o * sc.view(shape) + sh.view(shape)

        handles.append(hooked.get_submodule(site.name).register_forward_hook(hook))
    torch.testing.assert_close(_out(folded, toy_batches), _out(hooked, toy_batches), rtol=1e-5, atol=1e-5)
    for h in handles:
        h.remove()
    assert all(not m._forward_hooks for m in folded.modules())
    if kind == "block":
        assert list(affine_modules(folded)) == ["block"]
    else:
        assert affine_modules(folded) == {}  # conv (bias / consumer BN), BN affine and linear all fold


def test_sites_from_structure(toy):
    assert [s.name for s in discover_sites(toy, ("block",))] == ["block"]
    assert [s.name for s in discover_sites(toy, ("logits",))] == ["fc"]
    conv = {s.name: s.consumer_bn for s in discover_sites(toy, ("conv",))}
    assert conv == {"conv1": "bn1", "block.conv": "block.bn", "conv3": "bn3"}


def test_missing_site_kind_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(UserError, match="'block' does not exist"):
        discover_sites(model, ("block",))


@pytest.mark.parametrize(
    "pipeline",
    [
        "bn",
        "asr@conv>bn",
        "bn>asr@block+logits",
        "bn>lw@block+logits",
        "naive@bn>bn",
        "bn>asr@conv+bn+block+logits:noshift:lam=median",
    ],
)
def test_pipelines_run_and_leave_no_hooks(toy, toy_batches, pipeline):
    p = _pruned(toy, 0.9)
    report = run_repair(p, pipeline, toy_batches, dense=toy)
    assert report.pipeline == str(RepairPipeline.parse(pipeline))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in p.modules())
    assert torch.isfinite(_out(p, toy_batches)).all()
    # masks survive repair: scaling never revives a pruned weight
    for l in prunable_layers(p):
        w = p.get_submodule(l.name).weight
        assert int((w == 0).sum()) >= n_pruned(0.9, l.n_weights)


def test_repair_restores_site_statistics(toy, toy_batches):
    """naive with mean shift matches dense mean and variance exactly at a single site."""
    p = _pruned(toy, 0.5)  # no dead logit at this sparsity (a dead channel keeps gamma = 1)
    run_repair(p, "naive@logits", toy_batches, dense=toy)
    site = discover_sites(toy, ("logits",))
    d = site_moments(toy, site, toy_batches)["fc"]
    r = site_moments(p, site, toy_batches)["fc"]
    torch.testing.assert_close(r.mean, d.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r.var, d.var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("text", ["asr", "asr@nowhere", "foo@block", "asr@block:lam=mode", "asr@block:bogus"])
def test_bad_pipeline_text(text):
    with pytest.raises(UserError):
        RepairPipeline.parse(text)


def test_nm_mask_has_exactly_n_per_group():
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)
    keep = nm_mask(w, 2, 4)
    groups = keep.movedim(1, -1).reshape(6, 3, 3, 2, 4)
    assert torch.all(groups.sum(-1) == 2)
    # the kept ones are the largest of each group
    a = w.abs().movedim(1, -1).reshape(6, 3, 3, 2, 4)
    kept_min = torch.where(groups, a, torch.full_like(a, float("inf"))).min(-1).values
    dropped_max = torch.where(~groups, a, torch.full_like(a, -1.0)).max(-1).values
    assert torch.all(kept_min >= dropped_max)
    assert nm_mask(torch.randn(4, 3, 3, 3)) is None  # 3 input channels: stays dense
    lin = nm_mask(torch.randn(5, 8))
    assert torch.all(lin.reshape(5, 2, 4).sum(-1) == 2)


def test_magnitude_mask_counts_and_ties():
    w = torch.tensor([[1.0, -1.0, 0.5, 2.0]])
    keep = magnitude_mask(w, 2)
    assert keep.tolist() == [[False, True, False, True]]  # ties broken by index
    assert int((~magnitude_mask(torch.randn(10, 10), 37)).sum()) == 37


@pytest.mark.parametrize(
    "pipeline", ["asr@conv>bn", "bn>asr@block+logits", "bn>naive@conv+logits:noshift", "bn>naive@bn+block"]
)
def test_single_pass_equals_per_site_recompute(toy, toy_batches, pipeline):
    a, b = _pruned(toy, 0.9), _pruned(toy, 0.9)
    ra = run_repair(a, pipeline, toy_batches, dense=toy, staged=True)
    rb = run_repair(b, pipeline, toy_batches, dense=toy, staged=False)
    torch.testing.assert_close(_out(a, toy_batches), _out(b, toy_batches), rtol=1e-5, atol=1e-5)
    # nested sites (a BN inside a block site) cannot share one cut: that step recomputes per site
    nested = "bn+block" in pipeline
    assert ra.calib_passes < rb.calib_passes or nested
    # a tiny memory limit forces the fallback part-way and still gives the same model
    c = _pruned(toy, 0.9)
    run_repair(c, pipeline, toy_batches, dense=toy, staged=True, max_cache_bytes=1)
    torch.testing.assert_close(_out(c, toy_batches), _out(b, toy_batches), rtol=1e-5, atol=1e-5)


TV_MODELS = {  # model -> site kinds that exist in it
    "resnet18": ("conv", "bn", "block", "logits"),
    "vgg11_bn": ("conv", "bn", "logits"),
    "mobilenet_v2": ("conv", "bn", "block", "logits"),
    "densenet121": ("conv", "bn", "logits"),
}


@pytest.mark.parametrize("name", sorted(TV_MODELS))
def test_sites_on_torchvision_models(name):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    present = TV_MODELS[name]
    example = torch.randn(2, 3, 64, 64)
    for kind in ("conv", "bn", "block", "logits"):
        if kind in present:
            assert discover_sites(model, (kind,), example), (name, kind)
        else:  # a step whose only kind is missing has nothing to correct: refused
            with pytest.raises(UserError, match=f"'{kind}' does not exist"):
                discover_sites(model, (kind,), example)
    # a missing kind beside one that exists is skipped and reported, not refused
    missing: list[str] = []
    sites = discover_sites(model, ("block", "logits"), example, missing=missing)
    assert missing == ([] if "block" in present else ["block"])
    assert any(s.kind == "logits" for s in sites)
    for ex in (example, None):  # the recorded forward and the fx fallback agree on these models
        blocks = [s.name for s in discover_sites(model, ("block", "logits"), ex) if s.kind == "block"]
        if name == "resnet18":
            assert blocks == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
        if name == "mobilenet_v2":  # only inverted residuals with a skip connection are blocks
            assert "features.2" not in blocks and "features.3" in blocks
    # a full repair on a pruned copy runs, folds or attaches, and leaves no hooks
    batches = [(torch.randn(4, 3, 64, 64), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    pruned = _pruned(model, 0.7)
    pipe = "bn>asr@block+logits" if "block" in present else "bn>asr@bn+logits"
    run_repair(pruned, pipe, batches, dense=model)
    assert all(not m._forward_hooks for m in pruned.modules())
    assert torch.isfinite(_out(pruned, batches)).all()


@pytest.mark.parametrize(
    "text, words",
    [
        ("bn>asr@block:lam=nan", "finite number >= 0"),
        ("bn>asr@block:lam=-1", "finite number >= 0"),
        ("bn>asr@block:lam=inf", "finite number >= 0"),
        ("bn>naive@block:lam=0.5", "lam applies to asr only"),
        ("bn>lw@block:lam=median", "lam applies to asr only"),
    ],
)
def test_a_lambda_that_would_be_ignored_or_meaningless_is_refused(text, words):
    with pytest.raises(UserError) as e:
        RepairPipeline.parse(text)
    assert words in str(e.value)


def test_list_shows_every_registered_step_form(capsys):
    from rr_alloc.cli import main
    from rr_alloc.repair.steps import step_kinds

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(kind.grammar and kind.grammar in out for kind in step_kinds())


def test_bn_recalibration_is_exact_and_independent_of_batch_size(toy, toy_batches):
    from rr_alloc.data.splits import Batches

    x = torch.cat([b[0] for b in toy_batches])
    results = []
    for bs in (1, 5, 64):
        p = _pruned(toy)
        recalibrate_bn(p, Batches(x, torch.zeros(len(x)), bs))
        results.append({k: v.clone() for k, v in p.state_dict().items() if "running" in k})
        # each BatchNorm's statistics are those of its whole input, with the ones before it recalibrated
        seen = {}
        with torch.no_grad():
            h = p.bn3.register_forward_pre_hook(lambda m, i: seen.update(x=i[0]))
            p.eval()(x)
            h.remove()
        torch.testing.assert_close(p.bn3.running_mean, seen["x"].mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.bn3.running_var, seen["x"].var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    for r in results[1:]:
        for k in r:
            torch.testing.assert_close(r[k], results[0][k], rtol=1e-5, atol=1e-6)


def test_verify_prints_the_same_figures_at_any_batch_size(tmp_path):
    from test_cli import run_cli

    out = tmp_path / "plan.json"
    assert run_cli("search", "--budget", "0.9", "--out", str(out)).returncode == 0
    rows = []
    for bs in ("1", "256"):
        r = run_cli("verify", "--plan", str(out), "--batch-size", bs)
        assert r.returncode == 0, r.stderr
        rows.append(next(l.split() for l in r.stdout.splitlines() if "+ repair" in l))
    assert rows[0] == rows[1]
