"""Which layers a plan holds: a weight tensor shared by two layers is planned once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from factories import tied_convs
from test_cli import run_cli
from torch import nn

from rr_alloc.nn.layers import prunable_layers, reconstructed_layers, weight_aliases


def test_a_tied_weight_is_one_layer():
    m = tied_convs()
    assert weight_aliases(m) == {"b": "a"}
    assert [l.name for l in prunable_layers(m)] == ["stem", "a", "fc"]
    assert reconstructed_layers(m) == ["stem", "a", "fc"]


def test_a_plan_of_a_tied_model_states_the_sparsity_of_its_unique_weights(tmp_path):
    out = tmp_path / "plan.json"
    args = ("search", "--budget", "0.8", "--model", "factories:tied_convs", "--allocator", "rr-greedy")
    r = run_cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "note: b shares its weight tensor with a: planned once, as a" in r.stdout
    plan = json.loads(out.read_text())
    assert [l["name"] for l in plan["layers"]] == ["stem", "a", "fc"]
    pruned = tmp_path / "pruned.pt"
    a = run_cli("apply", "--plan", str(out), "--trust-plan-model", "--out", str(pruned), "--repair", "obs")
    assert a.returncode == 0, a.stderr
    sd = torch.load(pruned, weights_only=True)
    unique = [sd["stem.weight"], sd["a.weight"], sd["fc.weight"]]
    zeros = sum(int((w == 0).sum()) for w in unique) / sum(w.numel() for w in unique)
    assert abs(zeros - 0.8) < 0.01 and torch.equal(sd["a.weight"], sd["b.weight"])


def test_conv2d_as_is_the_layers_own_convolution():
    from torch import nn

    from rr_alloc.nn.layers import conv2d_as

    x = torch.randn(2, 4, 9, 8, generator=torch.Generator().manual_seed(0))
    for mode in ("zeros", "reflect", "replicate", "circular"):
        for kw in ({"padding": 1}, {"padding": (2, 1)}, {"padding": "same", "dilation": 2}, {"padding": "valid"}):
            torch.manual_seed(0)
            layer = nn.Conv2d(4, 6, (3, 4) if kw["padding"] == "same" else 3, groups=2, padding_mode=mode, **kw)
            torch.testing.assert_close(conv2d_as(layer, x, layer.weight, layer.bias), layer(x))


def test_a_tied_weight_counts_the_macs_of_every_layer_that_uses_it():
    from rr_alloc.session import layer_macs

    m = tied_convs()
    x = torch.randn(1, 1, 8, 8)
    macs = layer_macs(m, prunable_layers(m), x)
    assert macs.tolist() == [64.0, 128.0, 1.0]  # a is used by a and b: twice its 8x8 output positions


def test_forward_hooks_remove_and_restore_mode_on_error():
    from rr_alloc.nn.hooks import forward_hooks

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).train()

    def boom(m, i, o):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        with forward_hooks(model, {"0": boom}):
            assert not model.training
            model(torch.zeros(1, 3))
    assert model.training and not model[0]._forward_hooks


class _DeadBranch(nn.Module):
    """``b``'s output is multiplied by zero: no noise there can reach the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.a(x) + 0.0 * self.b(x)
        return self.fc(y.mean((2, 3)))


def test_output_sensitivity_measures_what_reaches_the_logits():
    from rr_alloc.nn.layers import prunable_layers
    from rr_alloc.profiling.sensitivity import output_sensitivity

    torch.manual_seed(0)
    model = _DeadBranch().train()
    layers = prunable_layers(model)
    batches = [(torch.randn(16, 3, 6, 6), torch.zeros(16))]
    s = output_sensitivity(model, layers, batches, eps=0.05)
    names = [l.name for l in layers]
    assert s[names.index("b")] == 0.0 and s[names.index("a")] > 0 and s[names.index("fc")] > 0
    assert s.mean() == pytest.approx(1.0)
    np.testing.assert_array_equal(s, output_sensitivity(model, layers, batches, eps=0.05))  # same seed
    assert model.training and all(not m._forward_hooks for m in model.modules())


def test_layer_macs_on_grouped_and_strided_convs():
    from rr_alloc.nn.layers import layer_macs, prunable_layers

    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # depthwise, 10x10 -> 5x5
        nn.Conv2d(8, 16, 1, groups=2),  # grouped pointwise, 5x5
        nn.Conv2d(16, 4, 3),  # valid conv, 3x3
        nn.Flatten(),
        nn.Linear(36, 7),
    )
    layers = prunable_layers(model)
    a = layer_macs(model, layers, torch.randn(2, 8, 10, 10))
    np.testing.assert_array_equal(a, [25, 25, 9, 1])  # each weight is used once per output position
    # against a brute-force MAC count of each layer
    brute = [8 * 1 * 9 * 25, 16 * 4 * 25, 4 * 16 * 9 * 9, 7 * 36]
    np.testing.assert_array_equal(a * [l.n_weights for l in layers], brute)
