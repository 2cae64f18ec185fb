"""Reconstruction repair (lsq / obs): explicit float64 solves, exact masks and counts, closed-form profile."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rr_alloc.errors import UserError
from rr_alloc.nn.layers import prunable_layers
from rr_alloc.nn.pruning import apply_masks, magnitude_mask, masks_for_plan, n_pruned, nm_mask
from rr_alloc.profiling.rr import profile_rr
from rr_alloc.repair import RepairPipeline, run_repair
from rr_alloc.repair.reconstruct import bias_targets

LAYERS = ["conv1", "block.conv", "conv3", "fc"]  # the toy's block.conv is grouped: fitted group by group


def _double(toy, toy_batches):
    return toy.double().eval(), [(x.double(), y) for x, y in toy_batches]


def _pruned(model, s):
    p = copy.deepcopy(model)
    masks = masks_for_plan(p, {l.name: n_pruned(s, l.n_weights) for l in prunable_layers(p)})
    apply_masks(p, masks)
    return p, masks


def _inputs(model, name, batches):
    got = []
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: got.append(i[0].detach()))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    h.remove()
    return torch.cat(got)


def _rows(layer, x):
    """Explicit patches through F.unfold (an independent path from the library's strided views)."""
    if isinstance(layer, nn.Linear):
        return x
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _brute_lsq(dense, pruned, masks, batches, damp):
    """Sequential ridge solves per row with numpy, rerunning the network for every layer."""
    model = copy.deepcopy(pruned)
    targets = bias_targets(dense)
    n_images = sum(len(x) for x, _ in batches)
    for name in LAYERS:
        layer, dl = model.get_submodule(name), dense.get_submodule(name)
        xp = _rows(layer, _inputs(model, name, batches)).numpy()
        with torch.no_grad():
            yd = dl(_inputs(dense, name, batches))
        yd = (yd.permute(0, 2, 3, 1).reshape(-1, yd.shape[1]) if yd.dim() == 4 else yd).numpy()
        const = targets[name] is not None
        w = dl.weight.detach().flatten(1).numpy()
        b = dl.bias.detach().numpy() if dl.bias is not None else np.zeros(w.shape[0])
        keep = masks[name].flatten(1).numpy()
        new_w, new_b = np.zeros_like(w), np.zeros(w.shape[0])
        g = getattr(layer, "groups", 1)  # a grouped conv: each output row sees its group's inputs only
        og, dg = w.shape[0] // g, w.shape[1]
        for i in range(w.shape[0]):
            xg = xp[:, (i // og) * dg : (i // og + 1) * dg]
            frac = 0.01 * max(1.0, 1024 / n_images) if damp == "auto" else damp  # auto: 0.01 from 1024 images
            lam = frac * float((xg**2).sum(0).mean())
            A = xg[:, keep[i]]
            x0 = w[i, keep[i]]
            if const:
                A = np.concatenate([A, np.ones((A.shape[0], 1))], 1)
                x0 = np.append(x0, b[i])
            sol = np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ yd[:, i] + lam * x0)
            new_w[i, keep[i]] = sol[: keep[i].sum()]
            new_b[i] = sol[-1] if const else 0.0
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(new_w).view_as(layer.weight))
            if targets[name] == "bias":
                layer.bias.copy_(torch.from_numpy(new_b))
            elif targets[name]:
                model.get_submodule(targets[name]).running_mean.sub_(torch.from_numpy(new_b))
    return model


@pytest.mark.parametrize("damp", [1e-6, 0.01, 0.3])
def test_lsq_equals_explicit_float64_solve(toy, toy_batches, damp):
    dense, batches = _double(toy, toy_batches)
    pruned, masks = _pruned(dense, 0.8)
    want = _brute_lsq(dense, pruned, masks, batches, damp)
    got = copy.deepcopy(pruned)
    report = run_repair(got, f"lsq:damp={damp}", batches, dense=dense, masks=masks)
    assert report.reconstructed == LAYERS and not report.skipped
    for (n, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=n)


def test_auto_damping_is_the_cifar_damping_from_1024_images_and_grows_as_one_over_images(toy, toy_batches):
    """``damp=auto`` (the default) is 0.01 of the mean diagonal from 1024 calibration images on, 0.01 * 1024 / n
    below (0.08 on 128); an explicit ``damp=X`` is used as given. On the toy's 36 images every layer gets
    0.01 * 1024 / 36, exactly as the explicit solve with that damping."""
    from rr_alloc.repair.refit import effective_damp

    assert effective_damp(None, 1024) == effective_damp(None, 5000) == 0.01
    assert effective_damp(None, 128) == pytest.approx(0.08) and effective_damp(0.3, 128) == 0.3
    dense, batches = _double(toy, toy_batches)
    pruned, masks = _pruned(dense, 0.8)
    want = _brute_lsq(dense, pruned, masks, batches, "auto")
    for text in ("lsq", "lsq:damp=auto", f"lsq:damp={0.01 * 1024 / 36!r}"):
        got = copy.deepcopy(pruned)
        run_repair(got, text, batches, dense=dense, masks=masks)
        for (n, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=n)
    assert str(RepairPipeline.parse("lsq:damp=auto")) == "lsq" and str(RepairPipeline.parse("obs:damp=0.01")) == (
        "obs:damp=0.01"
    )


def test_lsq_keeps_the_masks_and_adds_nothing(toy, toy_batches):
    pruned, masks = _pruned(toy, 0.9)
    names = [n for n, _ in pruned.named_modules()]
    run_repair(pruned, "lsq>bn>naive@conv+logits", toy_batches, dense=toy, masks=masks)
    assert [n for n, _ in pruned.named_modules()] == names  # no module added
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in pruned.modules())
    for name, keep in masks.items():
        w = pruned.get_submodule(name).weight
        assert bool((w[~keep] == 0).all()) and int((w == 0).sum()) == int((~keep).sum()), name


def test_lockstep_equals_per_layer_passes_and_memory_fallback(toy, toy_batches):
    outs = []
    for kw in ({}, {"staged": False}):
        p, masks = _pruned(toy, 0.85)
        run_repair(p, "obs:damp=0.05", toy_batches, dense=toy, masks=masks, **kw)
        outs.append(p.state_dict())
    from rr_alloc.repair.reconstruct import ReconstructStep, reconstruct

    p, masks = _pruned(toy, 0.85)
    rep = reconstruct(p, toy, toy_batches, LAYERS, ReconstructStep("obs", 0.05), masks=masks, max_cache_bytes=1)
    assert "memory cap" in rep.path
    outs.append(p.state_dict())
    for other in outs[1:]:
        for k in outs[0]:
            torch.testing.assert_close(outs[0][k], other[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("s", [0.5, 0.9, 0.97])
def test_obs_keeps_every_layer_count(toy, toy_batches, s):
    pruned, masks = _pruned(toy, s)
    report = run_repair(pruned, "obs>bn", toy_batches, dense=toy, masks=masks)
    changed = 0
    for name, keep in masks.items():
        w = pruned.get_submodule(name).weight
        assert int((~report.masks[name]).sum()) == int((~keep).sum()), name
        assert bool((w[~report.masks[name]] == 0).all())
        changed += int((report.masks[name] != keep).sum())
    assert changed > 0  # OBS chose other weights than magnitude somewhere


def test_obs_nm_keeps_n_of_every_group(toy, toy_batches):
    pruned = copy.deepcopy(toy)
    masks = {
        n: k
        for n, k in ((l.name, nm_mask(toy.get_submodule(l.name).weight, 2, 4)) for l in prunable_layers(toy))
        if k is not None
    }
    apply_masks(pruned, masks)
    report = run_repair(pruned, "obs", toy_batches, dense=toy, masks=masks, nm=(2, 4))
    for name, keep in report.masks.items():
        g = keep.movedim(1, -1)
        g = g.reshape(*g.shape[:-1], g.shape[-1] // 4, 4)
        assert bool((g.sum(-1) == 2).all()), name


def test_lsq_survives_dead_inputs_without_damping():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).eval()
    with torch.no_grad():
        dense[0].weight[:3].zero_()
        dense[0].bias[:3] = -1.0  # three channels are dead after the ReLU: zero columns in the Gram
    batches = [(torch.randn(4, 3, 6, 6), torch.zeros(4))]
    pruned, masks = _pruned(dense, 0.95)
    run_repair(pruned, "lsq:damp=0", batches, dense=dense, masks=masks)
    assert all(torch.isfinite(p).all() for p in pruned.parameters())


@pytest.mark.parametrize("solve", ["exact", "sweep"])
@pytest.mark.parametrize("depthwise", [False, True])
def test_obs_without_damping_runs_on_fewer_samples_than_inputs(solve, depthwise):
    """``damp=0`` is legal: a rank-deficient Gram gets the least jitter that factorises it, never a crash."""
    torch.manual_seed(0)
    first = nn.Conv2d(8, 8, 5, groups=8) if depthwise else nn.Conv2d(8, 8, 5)
    dense = nn.Sequential(first, nn.Flatten(), nn.Linear(8, 4)).eval()
    batches = [(torch.randn(3, 8, 5, 5), None)]  # 3 samples: the 200- and 25-input Grams have rank 3
    pruned, masks = _pruned(dense, 0.5)
    before = {name: int(m.sum()) for name, m in masks.items()}
    run_repair(pruned, f"obs:damp=0:solve={solve}", batches, dense=dense, masks=masks)
    assert all(torch.isfinite(p).all() for p in pruned.parameters())
    for name, k in before.items():
        assert int((pruned.get_submodule(name).weight == 0).sum()) >= k


@pytest.mark.parametrize(
    "text,msg",
    [
        ("lsq:damp=-1", "bad value"),
        ("lsq:damp=x", "bad value"),
        ("lsq:foo=1", "unknown option"),
        ("obs:block=0", "bad value"),
        ("lsq:block=8", "unknown option"),
        ("obs:solve=exact:solve=sweep", "'solve' is given twice"),
        ("obs>naive@block:noshift:shift", "sets 'shift' twice"),
        ("bn>asr@block:lam=0.5:lam=mean", "sets 'lam' twice"),
        ("naive@block+", "needs sites"),
        ("naive@block+block", "named twice"),
    ],
)
def test_bad_or_repeated_repair_step_options_are_refused(text, msg):
    with pytest.raises(UserError, match=msg):
        RepairPipeline.parse(text)


def test_pipeline_text_round_trip_and_mask_rule():
    p = RepairPipeline.parse("obs:damp=0.1:block=64>bn>naive@block+logits")
    assert str(p) == "obs:damp=0.1:block=64>bn>naive@block+logits" and p.mask_rule == "obs" and p.reconstructs
    assert RepairPipeline.parse("lsq>bn").mask_rule == "magnitude"
    assert not RepairPipeline.parse("bn").reconstructs


def _obs_mask_alone(model, batches, name, k, damp):
    """The keep-mask the ``obs`` step chooses for layer ``name`` pruned alone (its inputs dense)."""
    from rr_alloc.repair.reconstruct import ReconstructStep, reconstruct

    alone = copy.deepcopy(model)
    keep = magnitude_mask(alone.get_submodule(name).weight, k)
    apply_masks(alone, {name: keep})
    return reconstruct(alone, model, batches, [name], ReconstructStep("obs", damp), masks={name: keep}).masks[name]


def _brute_lsq_profile(model, batches, grid, damp, obs=False):
    """Explicit float64 re-fit of each layer alone on dense inputs; residual energy / sum v_d (the profile's
    closed form is for dense convs: the grouped one keeps its channel-wise curve). ``obs``: on the masks the
    ``obs`` step chooses for the layer alone."""
    targets = bias_targets(model)
    out = {}
    for name in [n for n in LAYERS if n != "block.conv"]:
        layer = model.get_submodule(name)
        x = _inputs(model, name, batches)
        X = _rows(layer, x).numpy()
        with torch.no_grad():
            y = layer(x)
        y = (y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]) if y.dim() == 4 else y).numpy()
        v_d = y.var(0).sum()
        lam = damp * float((X**2).sum(0).mean())
        w = layer.weight.detach().flatten(1).numpy()
        b = layer.bias.detach().numpy() if layer.bias is not None else np.zeros(w.shape[0])
        const = targets[name] is not None
        vals = []
        for s in grid:
            k = n_pruned(s, layer.weight.numel())
            keep = _obs_mask_alone(model, batches, name, k, damp) if obs else magnitude_mask(layer.weight, k)
            keep = keep.flatten(1).numpy()
            err = 0.0
            for i in range(w.shape[0]):
                A, x0 = X[:, keep[i]], w[i, keep[i]]
                if const:
                    A, x0 = np.concatenate([A, np.ones((len(A), 1))], 1), np.append(x0, b[i])
                sol = np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ y[:, i] + lam * x0)
                err += float(((A @ sol - y[:, i]) ** 2).sum())
            vals.append(err / len(X) / v_d)
        out[name] = vals
    return out


@pytest.mark.parametrize("method,damp", [("lsq", 1e-6), ("lsq", 0.05), ("obs", 0.01)])
def test_lsq_and_obs_profiles_equal_brute_force(toy, toy_batches, method, damp):
    dense, batches = _double(toy, toy_batches)
    grid = (0.3, 0.7, 0.95)
    prof = profile_rr(dense, batches, grid, profile_repair=method, damp=damp)
    want = _brute_lsq_profile(dense, batches, grid, damp, obs=method == "obs")
    for i, name in enumerate(prof.names):
        if name in want:
            np.testing.assert_allclose(prof.d_res[i], want[name], rtol=1e-6, err_msg=name)
    chan = profile_rr(dense, batches, grid)
    np.testing.assert_allclose(prof.d_raw, chan.d_raw)  # the raw distortion does not depend on the repair
    i = prof.names.index("block.conv")  # skipped by the re-fit: keeps the channel-wise curve
    np.testing.assert_allclose(prof.d_res[i], chan.d_res[i])
    assert method in prof.meta["profile_repair"]
    if method == "obs":  # OBS chooses masks that the re-fit repairs better than magnitude's
        lsq = profile_rr(dense, batches, grid, profile_repair="lsq", damp=damp)
        assert (prof.d_res <= lsq.d_res * (1 + 1e-9)).mean() > 0.8


@pytest.fixture(scope="module")
def obs_plan(tmp_path_factory):
    from rr_alloc.cli import main

    out = tmp_path_factory.mktemp("obs") / "plan.json"
    assert main(["search", "--budget", "0.85", "--repair", "obs>bn>naive@block+logits", "--out", str(out)]) == 0
    return out


def test_obs_plan_is_version_2_and_apply_reproduces_verified_top1(obs_plan, tmp_path):
    import json

    from rr_alloc import load_pruned
    from rr_alloc.cli import main
    from rr_alloc.data.splits import DataSpec, load_splits
    from rr_alloc.models.digits import DigitsResNet
    from rr_alloc.plans.plan import Plan

    d = json.loads(obs_plan.read_text())
    assert d["version"] == 2 and d["mask_rule"] == "obs"
    out = tmp_path / "pruned.pt"
    assert main(["apply", "--plan", str(obs_plan), "--out", str(out)]) == 0
    plan = Plan.load(obs_plan)
    model = load_pruned(DigitsResNet(), out)
    test = load_splits(DataSpec.from_dict(plan.source["data"])).test
    with torch.no_grad():
        top1 = float(sum((model(x).argmax(1) == y).sum() for x, y in test)) / test.n
    assert top1 == pytest.approx(plan.verify["top1"], abs=1e-9)
    # the exported masks are the repair's (OBS) masks: exact counts, and the applied weights follow them
    assert main(["export", "--plan", str(obs_plan), "--format", "masks", "--out", str(tmp_path / "m.pt")]) == 0
    masks = torch.load(tmp_path / "m.pt", weights_only=True)
    from rr_alloc.models.digits import pretrained_digits_resnet

    magnitude = masks_for_plan(pretrained_digits_resnet(), plan.counts)
    for l in plan.layers:
        w = model.get_submodule(l.name).weight
        assert int((~masks[l.name]).sum()) == l.n_pruned and bool((w[~masks[l.name]] == 0).all())
    assert any(bool((masks[n] != magnitude[n]).any()) for n in magnitude)  # not magnitude masks


def test_every_export_of_a_reconstruction_plan_says_so(obs_plan, tmp_path, capsys):
    from rr_alloc.cli import main

    for fmt in ("torch-prune", "llm-compressor", "sparseml", "markdown", "nni", "csv"):
        capsys.readouterr()
        out = tmp_path / f"x.{fmt}"
        assert main(["export", "--plan", str(obs_plan), "--format", fmt, "--out", str(out)]) == 0
        said = capsys.readouterr().out + out.read_text()
        assert "rr_alloc apply" in said and "OBS-chosen" in said, fmt


def test_version_1_plan_cannot_claim_obs_masks(obs_plan):
    import json

    from rr_alloc.plans.plan import Plan

    d = json.loads(obs_plan.read_text())
    d["version"] = 1
    with pytest.raises(UserError, match="mask_rule"):
        Plan.from_dict(d)


def _reference_sparsegpt(W, H, lam, n_prune, block):
    """SparseGPT's algorithm written out plainly: eager updates of every later column, no lazy batches."""
    W = W.clone()
    rows, d = W.shape
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H + lam * torch.eye(d, dtype=H.dtype)), upper=True)
    prune = torch.zeros(rows, d, dtype=torch.bool)
    done = 0
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        k = n_prune - done if i2 == d else round(n_prune * (i2 * rows) / (rows * d)) - done
        done += k
        sal = (W[:, i1:i2] ** 2 / torch.diagonal(Hinv)[i1:i2][None, :] ** 2).flatten()
        mask = torch.zeros(sal.numel(), dtype=torch.bool)
        mask[torch.sort(sal, stable=True).indices[:k]] = True
        prune[:, i1:i2] = mask.view(rows, i2 - i1)
        for i in range(i1, i2):
            q = torch.where(prune[:, i], torch.zeros_like(W[:, i]), W[:, i])
            err = (W[:, i] - q) / Hinv[i, i]
            W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
            W[:, i] = q
    return ~prune, W


def test_the_sweep_equals_sparsegpts_reference_arithmetic_and_keeps_the_count():
    from rr_alloc.repair.refit import sweep

    torch.manual_seed(0)
    X = torch.randn(400, 24, dtype=torch.float64)
    H = X.T @ X
    W = torch.randn(7, 24, dtype=torch.float64)
    for n_prune in (0, 50, 120, 167):
        keep, out = sweep(W, H, 0.1, 24, n_prune=n_prune, block=5)
        ref_keep, ref = _reference_sparsegpt(W, H, 0.1, n_prune, 5)
        assert torch.equal(keep, ref_keep) and int((~keep).sum()) == n_prune
        assert torch.allclose(out, ref, atol=1e-10) and torch.all(out[~keep] == 0)


def test_the_sweep_with_fixed_masks_removes_exactly_those_weights():
    from rr_alloc.repair.refit import sweep

    torch.manual_seed(1)
    X = torch.randn(300, 12, dtype=torch.float64)
    H = X.T @ X
    W = torch.randn(5, 12, dtype=torch.float64)
    prune = torch.rand(5, 12) < 0.6
    keep, out = sweep(W, H, 0.05, 12, prune=prune, block=4)
    assert torch.equal(keep, ~prune) and torch.all(out[prune] == 0)
    # the error it leaves is never above that of just zeroing the pruned weights
    loss = lambda w: float(torch.einsum("ri,ij,rj->", w - W, H, w - W))  # noqa: E731
    assert loss(out) <= loss(W.masked_fill(prune, 0.0)) + 1e-9


@pytest.mark.parametrize("method", ["lsq", "obs"])
def test_layers_above_the_exact_budget_are_reconstructed_by_the_sweep(method, monkeypatch):
    """With the exact budget lowered below every layer, the sweep re-fits them all: counts kept exactly,
    and the result is close to the exact re-fit (the sweep is SparseGPT's approximation of it)."""
    import copy
    import importlib

    from rr_alloc.nn.pruning import apply_masks, masks_for_plan

    rec = importlib.import_module("rr_alloc.repair.reconstruct")
    from rr_alloc.repair import run_repair

    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    x = torch.randn(64, 3, 8, 8)
    batches = [(x[i : i + 16], None) for i in range(0, 64, 16)]
    counts = {"0": 130, "2": 400, "6": 20}

    def repaired(solve):
        m = copy.deepcopy(dense)
        masks = masks_for_plan(m, counts)
        apply_masks(m, masks)
        report = run_repair(m, f"{method}:solve={solve}", batches, dense=dense, masks=masks)
        return m, report

    exact, _ = repaired("exact")
    swept, report = repaired("sweep")
    for name, k in counts.items():
        assert int((swept.get_submodule(name).weight == 0).sum()) >= k
    with torch.no_grad():
        y, ye, ys = dense(x), exact(x), swept(x)
    err_e, err_s = float(((ye - y) ** 2).mean()), float(((ys - y) ** 2).mean())
    assert err_s <= 1.02 * err_e + 1e-9  # the conjugate gradients after the sweep reach the exact re-fit
    if method == "lsq":  # same masks: the same weights
        for name in counts:
            assert torch.allclose(swept.get_submodule(name).weight, exact.get_submodule(name).weight, atol=1e-5)
    monkeypatch.setattr(rec, "MAX_SOLVE_FLOPS", 1.0)
    auto, _ = repaired("auto")
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), swept.state_dict().values()))


def test_a_grouped_conv_is_fitted_per_group_as_its_block_diagonal_dense_conv():
    """lsq on a grouped conv equals lsq on the dense conv holding its weights block-diagonally (the other
    blocks pruned): each group is its own least-squares problem (float64, no damping)."""
    import copy

    from rr_alloc.repair import run_repair

    torch.manual_seed(0)
    g = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True).double()
    d = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    with torch.no_grad():
        d.weight.zero_()
        d.weight[:3, :2] = g.weight[:3]
        d.weight[3:, 2:] = g.weight[3:]
        d.bias.copy_(g.bias)
    x = torch.randn(32, 4, 6, 6, dtype=torch.float64)
    batches = [(x[i : i + 8], None) for i in range(0, 32, 8)]
    keep_g = torch.rand(g.weight.shape) > 0.5
    keep_d = torch.zeros(d.weight.shape, dtype=torch.bool)
    keep_d[:3, :2], keep_d[3:, 2:] = keep_g[:3], keep_g[3:]
    fits = []
    for dense, keep in ((g, keep_g), (d, keep_d)):
        dense_model = nn.Sequential(dense).eval()
        pruned = copy.deepcopy(dense_model)
        with torch.no_grad():
            pruned[0].weight.mul_(keep)
        report = run_repair(pruned, "lsq:damp=0", batches, dense=dense_model, masks={"0": keep})
        assert report.reconstructed == ["0"] and not report.skipped
        fits.append(pruned[0])
    fg, fd = fits
    assert torch.allclose(fd.weight[:3, :2], fg.weight[:3], atol=1e-9)
    assert torch.allclose(fd.weight[3:, 2:], fg.weight[3:], atol=1e-9)
    assert torch.allclose(fd.bias, fg.bias, atol=1e-9) and torch.all(fg.weight[~keep_g] == 0)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 9, 3, stride=2, padding=1, groups=3),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False),
    ],
    ids=["grouped", "depthwise"],
)
@pytest.mark.parametrize("targets,const", [(True, True), (True, False), (False, True)])
def test_grouped_gram_statistics_equal_one_gram_per_group(conv, targets, const):
    """A grouped layer's patches in group layout are ``input_patches``' column slices, and their batched
    statistics equal a ``GramStats`` fed each group's slices."""
    from rr_alloc.repair.grams import group_grams, group_outputs, group_patches
    from rr_alloc.repair.refit import GramStats, input_patches, output_rows

    torch.manual_seed(0)
    g = conv.groups
    xs = [torch.randn(4, conv.in_channels, 7, 7) for _ in range(3)]
    with torch.no_grad():
        ys = [conv(x) for x in xs]
    batched = group_grams(
        [(group_patches(conv, x), group_outputs(conv, y) if targets else None, len(x)) for x, y in zip(xs, ys)],
        g,
        const,
    )
    for i, got in enumerate(batched):
        want = GramStats(const)
        for x, y in zip(xs, ys):
            p, rows = input_patches(conv, x), output_rows(conv, y)
            dg, og = p.shape[1] // g, rows.shape[1] // g
            assert torch.equal(group_patches(conv, x)[i], p[:, i * dg : (i + 1) * dg].T)
            assert torch.equal(group_outputs(conv, y)[i], rows[:, i * og : (i + 1) * og])
            want.add(p[:, i * dg : (i + 1) * dg], rows[:, i * og : (i + 1) * og] if targets else None, len(x))
        assert got.n == want.n and got.images == want.images == 12
        assert torch.allclose(got.H, want.H, rtol=1e-5, atol=1e-5)
        if targets:
            assert torch.allclose(got.R, want.R, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lsq", "obs"])
@pytest.mark.parametrize("bias_to", ["bias", "1"])
def test_depthwise_groups_fitted_in_one_batch_equal_the_fit_of_each_group(method, bias_to):
    """The batched re-fit of a depthwise conv's groups equals ``fit_layer`` on each group: masks, weights and
    bias (or the next BatchNorm's running mean), a dead channel included (float64, damping as configured)."""
    from rr_alloc.repair.depthwise import fit_depthwise
    from rr_alloc.repair.grams import group_grams, group_outputs, group_patches
    from rr_alloc.repair.reconstruct import ReconstructStep, fit_layer

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=bias_to == "bias")
    dense = nn.Sequential(conv, nn.BatchNorm2d(6)).double().eval()
    dense[1].running_mean.normal_()
    x = torch.randn(16, 6, 5, 5, dtype=torch.float64)
    x[:, 2] = 0  # a dead input channel: its group's Gram is zero
    keep = torch.rand(conv.weight.shape) > 0.5
    with torch.no_grad():
        batches = [
            (group_patches(dense[0], x[i : i + 8]), group_outputs(dense[0], dense[0](x[i : i + 8])), 8) for i in (0, 8)
        ]
    grams = group_grams(batches, 6, True)
    step = ReconstructStep(method)
    fits = []
    for batched in (True, False):
        pruned = copy.deepcopy(dense)
        with torch.no_grad():
            pruned[0].weight.mul_(keep)
        if batched:
            k = fit_depthwise("0", pruned, dense[0], grams, keep, method, step.damp, bias_to)
        else:
            k = torch.cat(
                [
                    fit_layer("0", pruned, dense[0], gr, keep, step, bias_to, None, slice(i, i + 1))
                    for i, gr in enumerate(grams)
                ]
            )
        fits.append((k, pruned))
    (k1, m1), (k2, m2) = fits
    assert torch.equal(k1, k2) and int((~k1).sum()) == int((~keep).sum())
    assert torch.allclose(m1[0].weight, m2[0].weight, atol=1e-9) and torch.all(m1[0].weight[~k1] == 0)
    assert torch.allclose(m1[1].running_mean, m2[1].running_mean, atol=1e-9)
    if bias_to == "bias":
        assert torch.allclose(m1[0].bias, m2[0].bias, atol=1e-9)


def test_depthwise_convs_are_reconstructed_and_keep_their_counts():
    import copy

    from rr_alloc.nn.pruning import apply_masks, masks_for_plan
    from rr_alloc.repair import run_repair

    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv2d(3, 16, 1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()
    x = torch.randn(48, 3, 8, 8)
    batches = [(x[i : i + 16], None) for i in range(0, 48, 16)]
    counts = {"0": 24, "2": 90, "6": 30}
    pruned = copy.deepcopy(dense)
    masks = masks_for_plan(pruned, counts)
    apply_masks(pruned, masks)
    before = copy.deepcopy(pruned)
    report = run_repair(pruned, "obs", batches, dense=dense, masks=masks)
    assert "2" in report.reconstructed and "2" not in report.skipped
    assert int((pruned[2].weight == 0).sum()) >= 90 and int((~report.masks["2"]).sum()) == 90
    with torch.no_grad():
        h = lambda m: m[:3](x)  # noqa: E731 - the depthwise layer's output (after its input conv)
        err_after, err_before = float(((h(pruned) - h(dense)) ** 2).mean()), float(((h(before) - h(dense)) ** 2).mean())
    assert err_after < err_before


def test_conjugate_gradients_reach_the_exact_kept_weight_solve():
    from rr_alloc.repair.refit import refine_kept, solve_kept

    torch.manual_seed(2)
    X = torch.randn(500, 30, dtype=torch.float64) @ torch.randn(30, 30, dtype=torch.float64)  # ill-conditioned
    H = X.T @ X
    rhs = torch.randn(9, 30, dtype=torch.float64)
    keep = torch.rand(9, 30) > 0.4
    exact = solve_kept(H, rhs, keep, 0.05)
    cg = refine_kept(H, rhs, keep, 0.05, torch.zeros_like(rhs), 200)
    assert torch.allclose(cg, exact, rtol=1e-7, atol=1e-9) and torch.all(cg[~keep] == 0)
