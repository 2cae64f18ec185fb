"""Level database: entries equal the reconstruction they store, stitching reproduces the pipeline, caching."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from rr_alloc.nn.layers import prunable_layers
from rr_alloc.nn.pruning import apply_masks, magnitude_mask, n_pruned
from rr_alloc.repair import RepairPipeline
from rr_alloc.repair.reconstruct import ReconstructStep, reconstruct
from rr_alloc.search.level_db import LevelCache, LevelDatabase, build_database, ladder, reconstructed_layers
from rr_alloc.search.level_space import into_band, level_counts, level_moves

OBS = ReconstructStep("obs")


def _double(toy, toy_batches):
    return toy.double().eval(), [(x.double(), y) for x, y in toy_batches]


def _setup(toy, toy_batches, s=0.8):
    dense, batches = _double(toy, toy_batches)
    names = reconstructed_layers(dense)
    anchor = {n: n_pruned(s, dense.get_submodule(n).weight.numel()) for n in names}
    ladders = {n: ladder(dense.get_submodule(n).weight.numel(), 0.95, 0.2, [anchor[n]]) for n in names}
    return dense, batches, names, anchor, ladders


def test_ladder_is_geometric_in_density_and_holds_the_anchor():
    k = ladder(100_000, 0.99, 0.1, [87_301])
    assert k[0] == 0 and k[-1] == 99_000 and 87_301 in k
    assert np.all(np.diff(k) > 0)
    dens = 1 - k[(k != 87_301)][:-1] / 100_000
    assert np.allclose(dens[1:] / dens[:-1], 0.9, atol=1e-3)  # one step keeps 90% of the weights


@pytest.mark.parametrize("method", ["obs", "lsq"])
def test_dense_rule_level_equals_that_layer_reconstructed_alone(toy, toy_batches, method):
    """Each entry is exactly the reconstruction of the layer pruned alone (its inputs dense), float64."""
    dense, batches, names, anchor, ladders = _setup(toy, toy_batches)
    step = ReconstructStep(method)
    db = build_database(dense, batches, ladders, step, "dense", anchor, dtype=torch.float64)
    for name in ["conv1", "block.conv", "fc"]:
        for level in (1, db.level_of(name, anchor[name]), len(db.counts[name]) - 1):
            k = int(db.counts[name][level])
            alone = copy.deepcopy(dense)
            keep = magnitude_mask(alone.get_submodule(name).weight, k)
            apply_masks(alone, {name: keep})
            rep = reconstruct(alone, dense, batches, [name], step, masks={name: keep})
            got, _ = db.stitch(dense, {n: (level if n == name else 0) for n in names})
            layer = got.get_submodule(name)
            assert torch.equal(db.keep(dense, name, level), rep.masks[name])
            assert int((~rep.masks[name]).sum()) == k
            torch.testing.assert_close(layer.weight, alone.get_submodule(name).weight, rtol=0, atol=1e-12)
            target = db.targets[name]
            for key, v in alone.state_dict().items():  # the bias or the next BatchNorm's running mean
                own = key.startswith(f"{name}.") or (target not in (None, "bias") and key.startswith(f"{target}."))
                # the other layers sit at their dense level: re-fitted to their own dense inputs, a no-op
                torch.testing.assert_close(got.state_dict()[key], v, rtol=0, atol=1e-12 if own else 1e-8, msg=key)


def test_anchor_rule_at_anchor_levels_is_the_sequential_pipeline(toy, toy_batches):
    dense, batches, names, anchor, ladders = _setup(toy, toy_batches)
    db = build_database(dense, batches, ladders, OBS, "anchor", anchor, dtype=torch.float64)
    seq = copy.deepcopy(dense)
    masks = {n: magnitude_mask(seq.get_submodule(n).weight, anchor[n]) for n in names}
    apply_masks(seq, masks)
    reconstruct(seq, dense, batches, names, OBS, masks=masks)
    got, _ = db.stitch(dense, db.levels_of(anchor))
    for key, v in seq.state_dict().items():
        torch.testing.assert_close(got.state_dict()[key], v, rtol=0, atol=1e-12, msg=key)


def test_uniform_rule_level_is_the_uniform_model_reconstructed(toy, toy_batches):
    dense, batches, names, anchor, ladders = _setup(toy, toy_batches)
    db = build_database(dense, batches, ladders, OBS, "uniform", anchor, dtype=torch.float64)
    j = 3
    counts = {n: int(ladders[n][min(j, len(ladders[n]) - 1)]) for n in names}
    seq = copy.deepcopy(dense)
    masks = {n: magnitude_mask(seq.get_submodule(n).weight, counts[n]) for n in names}
    apply_masks(seq, masks)
    reconstruct(seq, dense, batches, names, OBS, masks=masks)
    first = names[0]  # the first layer sees the dense input under every rule; later ones the uniform model's
    got, _ = db.stitch(dense, db.levels_of(counts))
    last = names[-1]
    for name in (first, last):
        torch.testing.assert_close(
            got.get_submodule(name).weight, seq.get_submodule(name).weight, rtol=0, atol=1e-12, msg=name
        )


def test_database_round_trips_through_the_cache(toy, toy_batches, tmp_path):
    dense, batches, names, anchor, ladders = _setup(toy, toy_batches)
    db = build_database(dense, batches, ladders, OBS, "dense", anchor, dtype=torch.float16)
    cache = LevelCache(tmp_path)
    key = LevelCache.key({"x": 1})
    assert cache.get(key) is None
    cache.put(key, db)
    back = cache.get(key)
    assert isinstance(back, LevelDatabase) and back.meta == json.loads(json.dumps(db.meta))
    a, _ = db.stitch(dense, db.levels_of(anchor))
    b, _ = back.stitch(dense, back.levels_of(anchor))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    cache.path(key).write_bytes(b"not a database")  # a damaged entry is a miss and is removed
    assert cache.get(key) is None and not cache.path(key).exists()
    assert db.nbytes < sum(dense.get_submodule(n).weight.numel() * len(ladders[n]) for n in names) * 2 // 2 + 10_000


def test_level_moves_stay_in_the_band_and_plans_meet_the_budget_exactly(toy):
    from rr_alloc.allocators import AllocationProblem

    layers = prunable_layers(toy)
    L = len(layers)
    problem = AllocationProblem(layers, 0.8, np.zeros(L), np.full(L, 0.95))
    ladders = [ladder(layer.n_weights, 0.95, 0.1) for layer in layers]
    a = problem.cost / problem.n
    rng = np.random.default_rng(0)
    lv = np.array([int(np.searchsorted(lad, 0.8 * layer.n_weights)) for lad, layer in zip(ladders, layers)])
    hi = problem.target + 0.01 * problem.cost.sum()
    lv = into_band(ladders, lv, a, problem.target, hi, rng)
    assert lv is not None
    for _ in range(50):
        child = into_band(ladders, level_moves(ladders, lv, 3, rng), a, problem.target, hi, rng)
        if child is None:
            continue
        cost = sum(a[i] * ladders[i][child[i]] for i in range(L))
        assert problem.target - 1e-9 <= cost <= hi + 1e-9
        k = level_counts(problem, ladders, child)
        assert int(k.sum()) == int(round(0.8 * problem.n.sum()))  # the plan meets the budget to the weight
        assert np.all(k <= np.floor(0.95 * problem.n + 1e-9))
        lv = child


def test_pipeline_rest_after_reconstruction(toy):
    rest = RepairPipeline(RepairPipeline.parse("obs>bn>naive@block+logits").steps[1:])
    assert str(rest) == "bn>naive@block+logits"
