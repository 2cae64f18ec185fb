"""Allocator invariants (parametrized over the registry) and hand-checked baselines."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rr_alloc.allocators import (
    ALLOCATORS,
    RULES,
    AllocationProblem,
    choose_rule,
    get_allocator,
    lamp_scores,
    objective,
    round_to_budget,
)
from rr_alloc.allocators.rr import layer_curves
from rr_alloc.errors import UserError
from rr_alloc.nn.layers import LayerInfo
from rr_alloc.profiling.rr import RRProfile, profile_rr

GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
OPTUNA_TRIALS = 12


@pytest.fixture
def toy_problem_parts(toy, toy_batches):
    prof = profile_rr(toy, toy_batches, GRID)
    weights = {l.name: toy.get_submodule(l.name).weight.detach() for l in prof.layers}
    return prof, weights


def _problem(prof, weights, budget, lower=None, upper=None, unit="weights", evaluate=None):
    macs = np.array([64.0, 64.0, 16.0, 1.0]) if unit == "flops" else None
    # Optuna: past its 6 enqueued anchors and 2 more random start-up trials, so sampled plans are checked too
    return AllocationProblem(
        prof.layers,
        budget,
        lower,
        upper,
        unit=unit,
        macs_per_weight=macs,
        weights=weights,
        profile=prof,
        evaluate=evaluate,
        seed=0,
    )


def _alloc(name, **kw):
    """A registered allocator; the search with a short in-memory study."""
    return get_allocator(name, n_trials=OPTUNA_TRIALS, **kw) if name == "optuna" else get_allocator(name, **kw)


EVALUATED: list[np.ndarray] = []


def _fake_eval(counts):
    EVALUATED.append(np.asarray(counts).copy())
    return float(np.sum(np.asarray(counts) ** 1.5))


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
@pytest.mark.parametrize("budget", [0.5, 0.9, 0.95])
def test_budget_met_to_one_weight_per_layer(name, budget, toy_problem_parts):
    prof, weights = toy_problem_parts
    pb = _problem(prof, weights, budget, evaluate=_fake_eval)
    EVALUATED.clear()
    k = _alloc(name).allocate(pb)
    n = pb.n
    assert k.dtype.kind == "i" and np.all(k >= 0) and np.all(k <= np.floor(0.99 * n))
    assert int(k.sum()) == round(budget * int(n.sum()))  # exact for weight budgets
    for cand in EVALUATED:  # every candidate a search scored meets the budget too, sampled ones included
        assert int(cand.sum()) == round(budget * int(n.sum())) and np.all(cand <= np.floor(0.99 * n))
    if name == "optuna":
        assert len(EVALUATED) == OPTUNA_TRIALS
    elif name == "best-rule":
        assert len(EVALUATED) == len(RULES)


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_bounds_respected(name, toy_problem_parts):
    prof, weights = toy_problem_parts
    lower = np.array([0.0, 0.6, 0.0, 0.2])
    upper = np.array([0.5, 0.95, 0.97, 0.8])
    pb = _problem(prof, weights, 0.85, lower, upper, evaluate=_fake_eval)
    EVALUATED.clear()
    k = _alloc(name).allocate(pb)
    for cand in [k] + EVALUATED:
        s = cand / pb.n
        assert np.all(s >= lower - 1.0 / pb.n) and np.all(s <= upper + 1e-12)
    assert int(k.sum()) == round(0.85 * int(pb.n.sum()))


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_flop_budget_within_one_weight_per_layer(name, toy_problem_parts):
    prof, weights = toy_problem_parts
    pb = _problem(prof, weights, 0.8, unit="flops", evaluate=_fake_eval)
    k = _alloc(name).allocate(pb)
    a = pb.macs_per_weight
    # each layer is rounded to the nearest weight: at most half a weight's MACs per layer off the budget
    err = abs(float(a @ k) - 0.8 * float(a @ pb.n))
    assert err <= 0.5 * float(a.sum()) + 1e-6


def test_unreachable_budget_is_user_error(toy_problem_parts):
    prof, weights = toy_problem_parts
    with pytest.raises(UserError, match="unreachable"):
        _problem(prof, weights, 0.9, upper=np.full(4, 0.5))


def test_a_budget_that_prunes_no_weight_is_user_error(toy_problem_parts):
    prof, weights = toy_problem_parts
    with pytest.raises(UserError, match="prunes no weight"):
        _problem(prof, weights, 1e-9)


def _synthetic(seed: int, L: int = 3):
    rng = np.random.default_rng(seed)
    layers = [LayerInfo(f"l{i}", (int(n),), int(n), "linear") for i, n in enumerate(rng.integers(50, 400, L))]
    grid = np.array([0.3, 0.6, 0.9, 0.99])
    # non-convex, increasing curves
    d = np.cumsum(rng.uniform(0.01, 1.0, (L, len(grid))) * rng.choice([0.2, 3.0], (L, len(grid))), axis=1)
    prof = RRProfile(layers, grid, d * 2, d)
    return prof


def _brute_force(pb: AllocationProblem) -> float:
    """Enumerate each layer's segment, then solve the one-constraint LP for that choice."""
    from scipy.optimize import linprog

    curves = layer_curves(pb)
    c = pb.cost
    best = np.inf
    for choice in itertools.product(*[range(len(bs) - 1) for bs, _ in curves]):
        a, b_, va, vb = [], [], [], []
        for i, j in enumerate(choice):
            bs, vs = curves[i]
            a.append(bs[j])
            b_.append(bs[j + 1])
            va.append(vs[j])
            vb.append(vs[j + 1])
        a, b_, va, vb = map(np.array, (a, b_, va, vb))
        slope = (vb - va) / (b_ - a)
        res = linprog(slope, A_eq=c[None, :], b_eq=[pb.target], bounds=list(zip(a, b_)), method="highs")
        if res.status == 0:
            best = min(best, float(res.fun + np.sum(va - slope * a)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_exact_equals_brute_force(seed):
    prof = _synthetic(seed)
    for budget in (0.4, 0.75, 0.93):
        pb = AllocationProblem(prof.layers, budget, profile=prof)
        alloc = get_allocator("rr-exact")
        s = alloc.sparsities(pb)
        assert abs(pb.cost @ s - pb.target) < 1e-6 * pb.cost.sum()
        assert objective(pb, s) == pytest.approx(_brute_force(pb), rel=1e-7, abs=1e-9)
        # and never worse than greedy on the same objective
        assert objective(pb, s) <= objective(pb, get_allocator("rr-greedy").sparsities(pb)) + 1e-9


def test_lamp_scores_hand_checked():
    w = torch.tensor([3.0, -1.0, 2.0, 0.5])
    # sorted |w|: 0.5, 1, 2, 3 -> w^2: .25, 1, 4, 9; suffix sums 14.25, 14, 13, 9
    expect = {0.5: 0.25 / 14.25, -1.0: 1 / 14, 2.0: 4 / 13, 3.0: 1.0}
    got = lamp_scores(w)
    for v, e in expect.items():
        assert got[list(w.tolist()).index(v)] == pytest.approx(e)


def test_erk_hand_checked():
    # two layers: conv 4x2x3x3 (72 weights, raw density (4+2+3+3)/72 = 1/6) and linear 10x4
    # (40 weights, raw (10+4)/40 = 0.35). Budget 0.5 keeps 56 weights:
    # eps*(72/6 + 40*0.35) = eps*26 = 56 -> eps = 56/26; densities 0.3590, 0.7538
    layers = [LayerInfo("c", (4, 2, 3, 3), 72, "conv"), LayerInfo("f", (10, 4), 40, "linear")]
    pb = AllocationProblem(layers, 0.5, upper=np.full(2, 0.99))
    s = get_allocator("erk").sparsities(pb)
    eps = 56 / 26
    np.testing.assert_allclose(1 - s, [eps / 6, eps * 0.35], rtol=1e-9)
    # a layer whose density would exceed 1 is made dense and the scale re-solved
    pb = AllocationProblem(layers, 0.2, upper=np.full(2, 0.99))
    s = get_allocator("erk").sparsities(pb)
    assert s[1] == pytest.approx(0.0, abs=1e-12)
    assert s[0] == pytest.approx(0.2 * 112 / 72)


def test_global_magnitude_is_one_threshold(toy_problem_parts):
    prof, weights = toy_problem_parts
    pb = _problem(prof, weights, 0.6, upper=np.full(4, 0.999))
    k = get_allocator("global").allocate(pb)
    allw = torch.cat([w.abs().flatten() for w in weights.values()])
    t = torch.sort(allw).values[int(k.sum()) - 1]
    for w, kk in zip(weights.values(), k):
        assert abs(int((w.abs() <= t).sum()) - kk) <= 1


def test_round_to_budget_largest_remainder():
    layers = [LayerInfo(f"l{i}", (10,), 10, "linear") for i in range(3)]
    pb = AllocationProblem(layers, 0.5)
    k = round_to_budget(pb, np.array([0.55, 0.45, 0.5]))
    assert k.sum() == 15 and np.all(np.abs(k - np.array([5.5, 4.5, 5.0])) <= 1)


def test_same_seed_same_plan(toy_problem_parts):
    prof, weights = toy_problem_parts
    for name in ALLOCATORS:
        a = _alloc(name).allocate(_problem(prof, weights, 0.9, evaluate=_fake_eval))
        b = _alloc(name).allocate(_problem(prof, weights, 0.9, evaluate=_fake_eval))
        assert np.array_equal(a, b), name


def test_optuna_fixed_seed_reproduces_best_plan(toy_problem_parts):
    prof, weights = toy_problem_parts
    plans = []
    for _ in range(2):
        pb = _problem(prof, weights, 0.9, evaluate=_fake_eval)
        alloc = get_allocator("optuna", n_trials=14)
        plans.append(alloc.allocate(pb))
        assert len(alloc.study.trials) == 14
    assert np.array_equal(plans[0], plans[1])


def test_optuna_anchor_plans_are_members_of_the_family(toy_problem_parts):
    """Each warm-start trial reproduces its anchor plan (to rounding), so search can only improve on them."""
    prof, weights = toy_problem_parts
    from rr_alloc.search.optimizers import ANCHORS, SearchOptions

    pb = _problem(prof, weights, 0.9, evaluate=_fake_eval)
    alloc = get_allocator("optuna", options=SearchOptions(optimizer="tpe-mix"), n_trials=6)
    alloc.allocate(pb)

    for trial, name in zip(alloc.study.trials, ANCHORS):
        want = get_allocator(name).allocate(pb)
        got = np.array(trial.user_attrs["counts"])
        assert np.abs(got - want).max() <= max(2, int(0.002 * pb.n.max())), name


@pytest.mark.parametrize("unit", ["weights", "flops"])
@pytest.mark.parametrize("favourite", RULES)
def test_best_rule_returns_the_lowest_scoring_rule_counts_exactly(favourite, unit, toy_problem_parts):
    """best-rule scores every rule's plan and returns the winner's counts unchanged, with every score kept."""
    prof, weights = toy_problem_parts
    plans = {r: get_allocator(r).allocate(_problem(prof, weights, 0.9, unit=unit)) for r in RULES}
    target = plans[favourite]

    def distance(counts):  # zero at the favourite's plan; ties elsewhere only when two rules plan alike
        return float(np.abs(np.asarray(counts) - target).sum())

    best = get_allocator("best-rule")
    k = best.allocate(_problem(prof, weights, 0.9, unit=unit, evaluate=distance))
    assert best.chosen == min(RULES, key=lambda r: distance(plans[r]))  # the first of the rules at distance 0
    assert np.array_equal(k, plans[best.chosen]) and best.scores[best.chosen] == 0.0
    assert set(best.scores) == set(RULES)
    assert best.scores == {r: distance(plans[r]) for r in RULES}


def test_choose_rule_breaks_ties_towards_the_earlier_rule():
    chosen, scores = choose_rule({"global": 1, "uniform": 2, "lamp": 3}, lambda p: 1.0 if p != 2 else 0.5)
    assert chosen == "uniform" and scores == {"global": 1.0, "uniform": 0.5, "lamp": 1.0}
    chosen, _ = choose_rule({"global": 1, "uniform": 2, "lamp": 3}, lambda p: 0.0)
    assert chosen == "global"
    chosen, scores = choose_rule({"global": 1, "uniform": 2}, lambda p: float("nan") if p == 1 else 5.0)
    assert chosen == "uniform" and np.isnan(scores["global"])  # a diverged repair never wins
