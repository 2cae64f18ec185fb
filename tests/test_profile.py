"""The streaming RR profile equals an explicit float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rr_alloc.errors import UserError
from rr_alloc.nn.layers import prunable_layers
from rr_alloc.nn.pruning import magnitude_mask, n_pruned
from rr_alloc.profiling.rr import profile_rr, validate_grid


def _brute_force(model: nn.Module, batches, grid, lam_rule="mean", mean_shift=True):
    """Explicit pruned forward and explicit ASR repair, float64, means via torch.mean."""
    model = model.double().eval()
    layers = prunable_layers(model)
    inputs = {l.name: [] for l in layers}
    hooks = [
        model.get_submodule(l.name).register_forward_hook(lambda m, i, o, n=l.name: inputs[n].append(i[0].detach()))
        for l in layers
    ]
    with torch.no_grad():
        for x, _ in batches:
            model(x.double())
    for h in hooks:
        h.remove()
    d_raw = np.zeros((len(layers), len(grid)))
    d_res = np.zeros_like(d_raw)
    for i, l in enumerate(layers):
        mod = model.get_submodule(l.name)
        x = torch.cat(inputs[l.name])
        w = mod.weight.detach()
        with torch.no_grad():
            y_d = mod(x)
            for j, s in enumerate(grid):
                keep = magnitude_mask(w, n_pruned(s, w.numel()))
                if isinstance(mod, nn.Conv2d):
                    y_p = mod._conv_forward(x, w * keep, mod.bias)

                    def cd(t):
                        return t.transpose(0, 1).reshape(t.shape[1], -1)
                else:
                    y_p = nn.functional.linear(x, w * keep, mod.bias)

                    def cd(t):
                        return t.reshape(-1, t.shape[-1]).T

                yd, yp = cd(y_d), cd(y_p)
                mu_d, mu_p = torch.mean(yd, 1, keepdim=True), torch.mean(yp, 1, keepdim=True)
                v_d = torch.mean((yd - mu_d) ** 2, 1)
                v_p = torch.mean((yp - mu_p) ** 2, 1)
                lam = v_p.mean() if lam_rule == "mean" else v_p.median()
                shrink = v_p / (v_p + lam)
                gamma = shrink * torch.sqrt(v_d / v_p) + (1 - shrink)
                gamma = torch.where(v_p > 0, gamma, torch.ones_like(gamma))
                target = mu_d if mean_shift else mu_p
                yhat = gamma[:, None] * (yp - mu_p) + target
                d_raw[i, j] = float(torch.mean((yp - yd) ** 2, 1).sum() / v_d.sum())
                d_res[i, j] = float(torch.mean((yhat - yd) ** 2, 1).sum() / v_d.sum())
    return d_raw, d_res


GRID = (0.3, 0.5, 0.8, 0.95)


@pytest.mark.parametrize("fused_bias", [True, False], ids=["cpu-bias", "cuda-bias"])
@pytest.mark.parametrize("mean_shift", [True, False])
def test_closed_form_matches_brute_force(toy, toy_batches, mean_shift, fused_bias, monkeypatch):
    # both ways of adding the probe's bias (fused on CPU, dense row only on CUDA) run here on CPU
    import rr_alloc.profiling.rr

    monkeypatch.setattr(rr_alloc.profiling.rr, "_fuses_bias", lambda x: fused_bias)
    prof = profile_rr(toy, toy_batches, GRID, dtype=torch.float64, mean_shift=mean_shift)
    import copy

    raw, res = _brute_force(copy.deepcopy(toy), toy_batches, GRID, mean_shift=mean_shift)
    np.testing.assert_allclose(prof.d_raw, raw, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(prof.d_res, res, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(prof.rr, res / raw, rtol=1e-6)


def test_float32_profile_close_to_float64(toy, toy_batches):
    p32 = profile_rr(toy, toy_batches, GRID)
    p64 = profile_rr(toy, toy_batches, GRID, dtype=torch.float64)
    np.testing.assert_allclose(p32.d_res, p64.d_res, rtol=1e-3)


def test_profile_covers_every_layer_kind(toy, toy_batches):
    prof = profile_rr(toy, toy_batches, GRID)
    assert prof.names == ["conv1", "block.conv", "conv3", "fc"]
    assert prof.layers[1].groups == 2
    assert prof.d_raw.shape == (4, len(GRID))
    # more pruning -> more raw damage, on every layer
    assert np.all(np.diff(prof.d_raw, axis=1) > 0)


def test_profile_leaves_no_hooks_and_same_weights(toy, toy_batches):
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    profile_rr(toy, toy_batches, GRID)
    for m in toy.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    for k, v in toy.state_dict().items():
        assert torch.equal(v, before[k])


def test_profile_removes_hooks_on_error(toy):
    bad = [(torch.randn(2, 4, 8, 8), None)]  # wrong channel count -> forward raises
    with pytest.raises(RuntimeError):
        profile_rr(toy, bad, GRID)
    assert all(not m._forward_hooks for m in toy.modules())


def test_grid_must_reach_s_max():
    with pytest.raises(UserError, match="s-max"):
        validate_grid([0.5, 0.9], 0.99)
    assert list(validate_grid([0.9, 0.5, 0.99], 0.99)) == [0.5, 0.9, 0.99]


def test_profile_cache_hit_and_corruption(tmp_path):
    import json

    from rr_alloc.profiling.store import ProfileCache

    cache = ProfileCache(tmp_path)
    key = ProfileCache.key({"model": "abc", "grid": [0.5]})
    assert cache.get(key) is None
    cache.put(key, {"x": [1, 2, 3]})
    assert cache.get(key) == {"x": [1, 2, 3]}
    # a tampered payload fails its checksum: reported as a miss and removed, never used
    entry = json.loads(cache.path(key).read_text())
    entry["payload"]["x"] = [9]
    cache.path(key).write_text(json.dumps(entry))
    assert cache.get(key) is None and not cache.path(key).exists()
    cache.path(key).write_text("{truncated")
    assert cache.get(key) is None
    # a stale entry stored under another key is not served for this one
    other = ProfileCache.key({"model": "abd", "grid": [0.5]})
    cache.put(other, {"x": [1]})
    cache.path(other).rename(cache.path(key))
    assert cache.get(key) is None
    # a pipe in an entry's place is a miss (reading it would block), and the next write replaces it
    import os

    cache.path(key).unlink(missing_ok=True)
    os.mkfifo(cache.path(key))
    assert cache.get(key) is None
    cache.put(key, {"x": [4]})
    assert cache.path(key).is_file() and cache.get(key) == {"x": [4]}


def test_a_session_reuses_the_stored_profile(tmp_path, monkeypatch):
    from rr_alloc.config.run_config import RunConfig
    from rr_alloc.evidence import profile
    from rr_alloc.session import Session

    cfg = RunConfig(calib_size=128, selection_size=32, cache_dir=str(tmp_path))  # an empty cache of its own
    a = profile(Session(cfg, progress=False))
    b = profile(Session(cfg, progress=False))
    assert a.meta["cache"] == "miss" and b.meta["cache"] == "hit"
    np.testing.assert_array_equal(a.d_res, b.d_res)
    c = profile(Session(cfg.updated(seed=1), progress=False))  # other calibration images: new entry
    assert c.meta["cache"] == "miss"
