"""Which layers a plan holds: a weight tensor shared by two layers is planned once."""

from __future__ import annotations

import json

import torch
from factories import tied_convs
from test_cli import run_cli

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
