"""The end-to-end search: anchored spaces, the evolutionary sampler, screening, resume, validation fallback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rr_alloc.allocators import AllocationProblem, get_allocator
from rr_alloc.api import allocate
from rr_alloc.cli import main
from rr_alloc.config.run_config import RunConfig
from rr_alloc.profiling.rr import profile_rr
from rr_alloc.search.moves import block_moves, count_bounds, multiplier_counts, rr_move_probabilities
from rr_alloc.search.optimizers import SearchOptions
from rr_alloc.search.scoring import Screened, SelectionScorer, paired_upper_bound
from rr_alloc.session import Session

GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


@pytest.fixture
def parts(toy, toy_batches):
    prof = profile_rr(toy, toy_batches, GRID)
    weights = {l.name: toy.get_submodule(l.name).weight.detach() for l in prof.layers}
    return prof, weights


def _problem(prof, weights, budget=0.9, unit="weights", evaluate=None):
    macs = np.array([64.0, 64.0, 16.0, 1.0]) if unit == "flops" else None
    return AllocationProblem(
        prof.layers,
        budget,
        None,
        None,
        unit=unit,
        macs_per_weight=macs,
        weights=weights,
        profile=prof,
        evaluate=evaluate,
        seed=0,
    )


def _search(n_trials=20, **options):
    """The search allocator with typed options (an in-memory study of ``n_trials``)."""
    return get_allocator("optuna", options=SearchOptions(**options), n_trials=n_trials)


def _loss(counts):  # a smooth end-to-end stand-in: prefers pruning the big layers
    c = np.asarray(counts, float)
    return float(np.sum((c / np.array([1.0, 2.0, 4.0, 8.0])) ** 2))


class ScreeningLoss:
    """A scorer with ``score(counts, beat)``, as SelectionScorer: screen = loss + a fixed per-plan wobble."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, float | None]] = []

    def __call__(self, counts):
        return _loss(counts)

    def score(self, counts, beat=None):
        self.calls.append((np.asarray(counts).copy(), beat))
        full = _loss(counts)
        screen = full * (1.0 + 0.02 * (int(counts[0]) % 5))  # a per-plan wobble: screen and full can disagree
        if beat is not None and screen > beat:  # ties go on, as in SelectionScorer
            return Screened(screen, None, 1, 4)
        return Screened(screen, full, 1, 4)


# ------------------------------------------------------------ anchored spaces
def test_multipliers_at_zero_are_global_magnitude_exactly(parts):
    prof, weights = parts
    for unit in ("weights", "flops"):
        for budget in (0.5, 0.9, 0.97):
            pb = _problem(prof, weights, budget, unit)
            glob = get_allocator("global")
            got = multiplier_counts(pb, glob.sorted_scores(pb), np.zeros(len(pb.layers)))
            assert np.array_equal(got, glob.allocate(pb))
            # a common shift of every multiplier is absorbed by the threshold
            shifted = multiplier_counts(pb, glob.sorted_scores(pb), np.full(len(pb.layers), 0.7))
            assert np.array_equal(shifted, got)


def test_block_moves_keep_budget_and_bounds(parts):
    prof, weights = parts
    rng = np.random.default_rng(0)
    for unit in ("weights", "flops"):
        pb = _problem(prof, weights, 0.9, unit)
        k = get_allocator("global").allocate(pb)
        kmin, kmax = count_bounds(pb)
        a = pb.cost / pb.n
        for _ in range(200):
            k = block_moves(pb, k, float(rng.uniform(0.01, 0.5)), int(rng.integers(1, 4)), rng)
            assert np.all(k >= kmin) and np.all(k <= kmax)
            if unit == "weights":
                assert int(k.sum()) == round(0.9 * int(pb.n.sum()))
            else:  # MACs within one weight of the cheapest layer that can still move the right way
                err = pb.target - float(a @ k)
                room = (k < kmax) if err > 0 else (k > kmin)
                assert abs(err) <= a[room].min()


def test_rr_guidance_prefers_cheap_receivers(parts):
    prof, weights = parts
    pb = _problem(prof, weights)
    k = get_allocator("global").allocate(pb)
    p_donor, p_recv = rr_move_probabilities(pb, k)
    assert np.isclose(p_donor.sum(), 1) and np.isclose(p_recv.sum(), 1) and np.all(p_recv > 0)
    grid, curve = prof.curve("d_res")
    s = k / pb.n
    seg = np.clip(np.searchsorted(grid, s, side="right") - 1, 0, len(grid) - 2)
    rows = np.arange(len(s))
    marginal = (curve[rows, seg + 1] - curve[rows, seg]) / (grid[seg + 1] - grid[seg]) / pb.n
    assert np.argmax(p_recv) == np.argmin(marginal) and np.argmax(p_donor) == np.argmax(marginal)


# --------------------------------------------------------------- optimisers
@pytest.mark.parametrize("optimizer", ["evo", "cmaes", "tpe-mix"])
def test_every_candidate_meets_budget_and_anchor_is_global(parts, optimizer):
    prof, weights = parts
    seen = []
    pb = _problem(prof, weights, evaluate=lambda c: seen.append(np.asarray(c).copy()) or _loss(c))
    alloc = _search(optimizer=optimizer)
    k = alloc.allocate(pb)
    target = round(0.9 * int(pb.n.sum()))
    kmin, kmax = count_bounds(pb)
    assert len(seen) == 20 and int(k.sum()) == target
    assert all(int(c.sum()) == target and np.all(c >= kmin) and np.all(c <= kmax) for c in seen)
    if optimizer != "tpe-mix":  # the first (enqueued) trial is global magnitude itself
        assert np.array_equal(seen[0], get_allocator("global").allocate(pb))
    assert _loss(k) <= _loss(seen[0])  # never worse than the anchor on its own objective


@pytest.mark.parametrize("optimizer", ["evo", "cmaes"])
def test_same_seed_same_plan(parts, optimizer):
    prof, weights = parts
    plans = [_search(optimizer=optimizer).allocate(_problem(prof, weights, evaluate=_loss)) for _ in range(2)]
    assert np.array_equal(*plans)


def test_cmaes_first_generation_steps_sigma0_in_alpha_units(parts):
    """CMA-ES starts at global magnitude and its first generation steps SIGMA0 in log-multipliers."""
    from rr_alloc.search.optimizers import SIGMA0 as _SIGMA0

    prof, weights = parts
    alloc = _search(optimizer="cmaes")
    alloc.allocate(_problem(prof, weights, evaluate=_loss))
    trials = alloc.study.trials
    assert all(v == 0.0 for v in trials[0].params.values())  # the enqueued anchor
    first = np.array([list(t.params.values()) for t in trials[1:9]])  # popsize 4 + 3 ln 4 = 8 for 4 layers
    assert 0.4 * _SIGMA0 < first.std() < 2.0 * _SIGMA0


@pytest.mark.parametrize("guidance", ["rr", "none"])
def test_evo_improves_and_screens(parts, guidance):
    """Children are screened against their parent's screen; screened-out children are PRUNED, never parents."""
    from optuna.trial import TrialState

    prof, weights = parts
    scorer = ScreeningLoss()
    pb = _problem(prof, weights, evaluate=scorer)
    alloc = _search(n_trials=40, optimizer="evo", guidance=guidance)
    k = alloc.allocate(pb)
    trials = alloc.study.trials
    assert scorer.calls[0][1] is None  # the anchor is scored in full
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.value is None and "screen" in t.user_attrs for t in pruned)
    for t in trials[1:]:  # every child's parent was a COMPLETE trial and it was screened against that parent
        parent = trials[t.user_attrs["parent"]]
        assert parent.state == TrialState.COMPLETE and t.user_attrs["parent_screen"] == parent.user_attrs["screen"]
    assert _loss(k) == min(t.value for t in done) < _loss(get_allocator("global").allocate(pb))


def test_study_resumes_30_plus_10(tmp_path):
    import optuna

    out = tmp_path / "plan.json"
    storage = f"sqlite:///{(tmp_path / 'optuna.db').resolve()}"
    args = _small_search(tmp_path, out)
    assert main(args + ["--n-trials", "30"]) == 0
    assert main(args + ["--n-trials", "10"]) == 0
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert len(trials) == 40 and [t.number for t in trials] == list(range(40))
    enqueued = [t for t in trials if "fixed_params" in t.system_attrs]
    assert len(enqueued) == 1  # the anchor, once: the resumed run continues from the stored best
    resumed_parents = [t.user_attrs.get("parent") for t in trials[30:]]
    assert all(p is not None for p in resumed_parents)
    plan = json.loads(out.read_text())
    assert plan["search"]["optimizer"] == "evo" and plan["search"]["trials"] == 40


# -------------------------------------------------------------- validation
def test_paired_upper_bound():
    assert paired_upper_bound(np.full(50, -1.0) + np.linspace(-0.01, 0.01, 50)) < 0
    assert paired_upper_bound(np.linspace(-1, 1, 50)) > 0
    assert paired_upper_bound(np.array([-1.0])) == float("inf")


def _session(**kw) -> Session:
    cfg = RunConfig(calib_size=128, selection_size=128, validation_size=128, n_trials=6, allocator="optuna", **kw)
    return Session(cfg, progress=False)


def test_validation_split_is_disjoint_and_leaves_other_splits():
    session = _session()
    base = Session(RunConfig(calib_size=128, selection_size=128), progress=False)
    s = session.splits
    assert s.calib_indices == base.splits.calib_indices and s.selection_indices == base.splits.selection_indices
    assert len(s.validation_indices) == 128
    assert not set(s.validation_indices) & (set(s.calib_indices) | set(s.selection_indices))


class _Study:
    study_name, trials = "fake", []

    def get_trials(self, deepcopy=False, states=None):
        return []


def test_fallback_returns_global_when_search_does_not_beat_it():
    from rr_alloc.search.runner import validate

    session = _session()
    scorer = SelectionScorer(session, session.cfg.repair)
    glob = allocate(session, "global", 0.9).counts
    bad = allocate(session, "uniform", 0.9).counts  # worse than global on this model at 0.9
    got, prov = validate(session, dict(bad), glob, _Study(), scorer, 1.0)
    info = prov.to_dict()
    assert got == glob and info["fallback"] is True and info["validation_bound"] >= 0
    assert info["validation_size"] == 128
    # the same check keeps a plan that is better on the validation images (here: global magnitude, scored
    # against a worse anchor)
    got, prov = validate(session, dict(glob), bad, _Study(), scorer, 1.0)
    info = prov.to_dict()
    assert got == glob and info["fallback"] is False and info["validation_bound"] < 0


def test_search_plan_records_provenance_and_verify_rebuilds_validation(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "search",
                "--budget",
                "0.9",
                "--allocator",
                "optuna",
                "--n-trials",
                "8",
                "--out",
                str(out),
                "--calib-size",
                "128",
                "--selection-size",
                "128",
                "--validation-size",
                "64",
            ]
        )
        == 0
    )
    plan = json.loads(out.read_text())
    s = plan["search"]
    assert {"optimizer", "trials", "best_selection", "global_selection", "fallback", "validation_size"} <= set(s)
    assert s["validation_size"] == 64 and plan["source"]["data"]["validation_size"] == 64
    assert (out.parent / "search_progress.png").is_file()
    assert "validation (64 images)" in capsys.readouterr().out
    assert main(["verify", "--plan", str(out)]) == 0
    from rr_alloc.plans.plan import Plan
    from rr_alloc.plans.replay import config_from_plan

    rebuilt = Session(RunConfig(**config_from_plan(Plan.load(out))), progress=False).splits
    first = Session(RunConfig(calib_size=128, selection_size=128, validation_size=64), progress=False).splits
    for split in ("calib", "selection", "validation"):
        assert getattr(rebuilt, f"{split}_indices") == getattr(first, f"{split}_indices")


def test_explicit_study_name_refuses_another_budget(tmp_path, capsys):
    storage = f"sqlite:///{(tmp_path / 'optuna.db').resolve()}"
    args = [
        "search",
        "--allocator",
        "optuna",
        "--n-trials",
        "2",
        "--no-verify",
        "--calib-size",
        "64",
        "--selection-size",
        "64",
        "--storage",
        storage,
        "--study-name",
        "mine",
    ]
    assert main([*args, "--budget", "0.8", "--out", str(tmp_path / "a.json")]) == 0
    assert main([*args, "--budget", "0.9", "--out", str(tmp_path / "b.json")]) == 2
    assert "searches budget 0.8" in capsys.readouterr().err and not (tmp_path / "b.json").exists()
    # the same budget on other calibration images: scores on another scale, refused too
    assert main([*args, "--budget", "0.8", "--seed", "1", "--out", str(tmp_path / "c.json")]) == 2
    assert "other settings" in capsys.readouterr().err and not (tmp_path / "c.json").exists()
    assert main([*args, "--budget", "0.8", "--out", str(tmp_path / "d.json")]) == 0  # same settings: resumes


def test_bad_search_flags_are_one_line_errors(capsys):
    assert main(["search", "--budget", "0.9", "--allocator", "optuna", "--search-step", "1.5"]) == 2
    assert "search_step" in capsys.readouterr().err
    assert main(["search", "--budget", "0.9", "--allocator", "optuna", "--validation-size", "5000"]) == 2
    assert "--validation-size" in capsys.readouterr().err
    assert main(["search", "--budget", "0.9", "--allocator", "optuna", "--validation-size", "1"]) == 2
    assert "--validation-size 1" in capsys.readouterr().err


def test_compare_includes_the_search_when_asked(tmp_path, capsys):
    import pandas as pd

    assert (
        main(
            [
                "compare",
                "--budgets",
                "0.9",
                "--allocators",
                "global",
                "optuna",
                "--n-trials",
                "5",
                "--out-dir",
                str(tmp_path),
                "--calib-size",
                "96",
                "--selection-size",
                "64",
                "--validation-size",
                "64",
            ]
        )
        == 0
    )
    df = pd.read_csv(tmp_path / "compare.csv")
    assert list(df.allocator) == ["global", "optuna"] and df.search_fallback.notna().sum() == 1
    assert "search: evo" in capsys.readouterr().out


def test_search_flops_budget_and_bounds(tmp_path):
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "search",
                "--budget",
                "0.8",
                "--unit",
                "flops",
                "--allocator",
                "optuna",
                "--n-trials",
                "6",
                "--s-max",
                "0.95",
                "--out",
                str(out),
                "--no-verify",
                "--calib-size",
                "96",
                "--selection-size",
                "64",
            ]
        )
        == 0
    )
    plan = json.loads(out.read_text())
    assert all(l["sparsity"] <= 0.95 + 1e-9 for l in plan["layers"])
    assert abs(plan["achieved_sparsity"] - 0.8) < 1e-3


def test_search_repair_scores_candidates_and_repair_verifies(tmp_path):
    out = tmp_path / "plan.json"
    assert (
        main(
            [
                "search",
                "--budget",
                "0.9",
                "--allocator",
                "optuna",
                "--n-trials",
                "4",
                "--out",
                str(out),
                "--calib-size",
                "96",
                "--selection-size",
                "64",
                "--repair",
                "bn",
                "--search-repair",
                "bn>naive@block+logits",
            ]
        )
        == 0
    )
    plan = json.loads(out.read_text())
    assert plan["repair"] == "bn" and plan["search"]["repair"] == "bn>naive@block+logits"


def test_cmaes_state_is_the_same_for_every_worker_however_trials_finish():
    """Generations are told in trial-number order once no lower trial is open: two workers (or a resumed
    run) rebuild the same CMA-ES state from one study, and no trial is told twice."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from rr_alloc.search.samplers import CmaSampler

    names = ["a:x", "a:y"]
    dist = {n: FloatDistribution(-3, 3) for n in names}
    rng = np.random.default_rng(0)
    trials = []
    for _ in range(12):
        x = rng.normal(size=2)
        trials.append(create_trial(params=dict(zip(names, x)), distributions=dist, value=float((x**2).sum())))
    study2 = optuna.create_study()
    for t in trials:
        study2.add_trial(t)
    a, b = (CmaSampler(names, np.zeros(2), 0.2, (-3.0, 3.0), seed=s) for s in (0, 1))
    ma, mb = a.optimizer(study2), b.optimizer(study2)
    pop = ma.population_size
    assert a.told == b.told == set(range(pop * (12 // pop)))
    assert np.allclose(ma.mean, mb.mean)
    # with a lower-numbered trial still open, later completed trials wait for it
    study3 = optuna.create_study()
    study3.add_trial(create_trial(state=TrialState.WAITING, params={}, distributions={}))
    for t in trials:
        study3.add_trial(t)
    c = CmaSampler(names, np.zeros(2), 0.2, (-3.0, 3.0), seed=0)
    c.optimizer(study3)
    assert c.told == set()


# ---------------------------------------------------------- level search
OBS_REPAIR = "obs>bn>naive@block+logits"


def _small_search(tmp_path, out, *extra: str) -> list[str]:
    """A search at 0.8 on 64 + 64 digits images, its study in SQLite under ``tmp_path``, no verification."""
    storage = f"sqlite:///{(tmp_path / 'optuna.db').resolve()}"
    return ["search", "--budget", "0.8", "--allocator", "optuna", "--out", str(out), "--no-verify"] + [
        *("--calib-size", "64", "--selection-size", "64", "--storage", storage, *extra)
    ]


def _level_search(tmp_path, out, *extra: str) -> list[str]:
    return _small_search(tmp_path, out, "--repair", OBS_REPAIR, "--cache-dir", str(tmp_path / "cache"), *extra)


def test_level_search_meets_budget_reads_cached_database_and_resumes(tmp_path):
    import optuna

    out = tmp_path / "plan.json"
    assert main(_level_search(tmp_path, out, "--n-trials", "12")) == 0
    plan = json.loads(out.read_text())
    total = sum(l["n_weights"] for l in plan["layers"])
    assert sum(l["n_pruned"] for l in plan["layers"]) == round(0.8 * total)  # the budget, to the weight
    db = plan["search"]["database"]
    assert db["input_rule"] == "anchor" and db["repair"] == "obs" and db["cache"] == "miss" and db["levels"] > 0
    assert plan["search"]["stages"] == [16, 32] and plan["search"]["trials"] == 12
    assert len(list((tmp_path / "cache" / "levels").glob("*.pt"))) == 1

    assert main(_level_search(tmp_path, out, "--n-trials", "5")) == 0  # resumed: same study, database cached
    plan = json.loads(out.read_text())
    assert plan["search"]["database"]["cache"] == "hit" and plan["search"]["trials"] == 17
    (name,) = optuna.get_all_study_names(f"sqlite:///{(tmp_path / 'optuna.db').resolve()}")
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{(tmp_path / 'optuna.db').resolve()}").trials
    assert len([t for t in trials if "fixed_params" in t.system_attrs]) == 1  # the anchor, once
    assert all(t.user_attrs.get("parent") is not None for t in trials[12:])
    best = min((t for t in trials if t.value is not None), key=lambda t: t.value)
    assert [l["n_pruned"] for l in plan["layers"]] == best.user_attrs["counts"] or plan["search"]["fallback"]
    anchor = trials[0]
    assert anchor.user_attrs["counts"] == anchor.user_attrs["level_counts"]  # global magnitude is on the ladder


def test_level_search_anchor_trial_scores_the_full_pipeline(tmp_path):
    """Under the anchor input rule the stitched candidate of the anchor plan (the best rule) is the full
    sequential pipeline."""
    import optuna

    out = tmp_path / "plan.json"
    assert main(_level_search(tmp_path, out, "--n-trials", "1")) == 0
    plan = json.loads(out.read_text())
    storage = f"sqlite:///{(tmp_path / 'optuna.db').resolve()}"
    (name,) = optuna.get_all_study_names(storage)
    (anchor,) = optuna.load_study(study_name=name, storage=storage).trials
    session = Session(RunConfig(calib_size=64, selection_size=64, repair=OBS_REPAIR, cache=False), progress=False)
    rule = plan["search"]["anchor"]
    full = SelectionScorer(session, OBS_REPAIR)(allocate(session, rule, 0.8).counts)
    assert anchor.value == pytest.approx(full, rel=1e-5, abs=1e-7)
    assert plan["search"]["anchor_selection"] == anchor.value
    assert plan["search"]["rule_scores"][rule] == pytest.approx(full, rel=1e-9)


def test_level_inputs_off_scores_level_candidates_by_the_full_pipeline_and_bad_rule_is_refused(tmp_path, capsys):
    import optuna

    out = tmp_path / "plan.json"
    assert main(_level_search(tmp_path, out, "--n-trials", "4", "--level-inputs", "off")) == 0
    plan = json.loads(out.read_text())
    total = sum(l["n_weights"] for l in plan["layers"])
    assert sum(l["n_pruned"] for l in plan["layers"]) == round(0.8 * total)  # the budget, to the weight
    assert "database" not in plan["search"] and not (tmp_path / "cache" / "levels").exists()  # none built
    assert plan["search"]["level_inputs"] == "off" and plan["search"]["stages"] == [16, 32]
    storage = f"sqlite:///{(tmp_path / 'optuna.db').resolve()}"
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert all("level_counts" in t.user_attrs for t in trials)  # candidates move on the ladder levels
    session = Session(RunConfig(calib_size=64, selection_size=64, repair=OBS_REPAIR, cache=False), progress=False)
    full_score = SelectionScorer(session, OBS_REPAIR)
    for t in (t for t in trials if t.value is not None):  # a completed level candidate is the full pipeline's
        counts = dict(zip((layer.name for layer in session.layers), t.user_attrs["level_counts"]))
        assert t.value == pytest.approx(full_score(counts), rel=1e-5, abs=1e-7)
    # and so is a candidate away from the anchor (children are often stopped early, so score one directly)
    from rr_alloc.search.databases import level_ladders
    from rr_alloc.search.stitched import SequentialLevelScorer

    glob = allocate(session, "global", 0.8).counts
    scorer = SequentialLevelScorer(session, OBS_REPAIR, level_ladders(session, glob))
    levels = {n: max(0, int(np.searchsorted(scorer.ladders[n], glob[n])) - 1) for n in glob}  # a level denser
    counts = {n: int(scorer.ladders[n][levels[n]]) for n in glob}
    assert counts != glob
    full = scorer.score_levels(scorer.all_levels(levels)).full
    assert full == pytest.approx(full_score(counts), rel=1e-5, abs=1e-7)
    args = _level_search(tmp_path, tmp_path / "p2.json", "--n-trials", "3", "--level-inputs", "dense")
    args[args.index(OBS_REPAIR)] = "bn"
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--level-inputs dense needs a search repair" in err[0]


def test_the_search_starts_from_the_best_scoring_rule_and_falls_back_to_it(tmp_path, monkeypatch):
    """A toy scorer under which uniform beats global magnitude: the search's anchor is uniform, its first trial
    is uniform's plan, and a search that does not beat it on validation images returns uniform's counts."""
    import optuna

    import rr_alloc.api as api

    class UniformWins:
        def __init__(self, session, repair, objective="kl"):
            self.uniform = allocate(session, "uniform", 0.9).counts

        def __call__(self, counts):
            return 0.0 if dict(counts) == self.uniform else 1.0

    monkeypatch.setattr(api, "SelectionScorer", UniformWins)
    storage = f"sqlite:///{(tmp_path / 'o.db').resolve()}"
    cfg = RunConfig(
        calib_size=64, selection_size=64, validation_size=64, n_trials=3, allocator="optuna", storage=storage
    )
    session = Session(cfg.updated(repair="bn>naive@block+logits"), progress=False)
    found = allocate(session, "optuna", 0.9)
    uniform = allocate(session, "uniform", 0.9).counts
    assert found.search.anchor == "uniform" and found.search.rule_scores["uniform"] == 0.0
    assert set(found.search.rule_scores) == set(api.ANCHOR_RULES)
    first = optuna.load_study(study_name=found.study.study_name, storage=storage).trials[0]
    assert first.user_attrs["counts"] == [uniform[layer.name] for layer in session.layers]
    assert first.user_attrs["anchor"] == "uniform"
    if found.search.fallback:
        assert found.counts == uniform
