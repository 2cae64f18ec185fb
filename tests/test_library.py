"""The library API: the README's example runs as written, and the spine's functions return their results."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from rr_alloc import Allocation, RunConfig, Session, Verification, allocate, build_plan, evaluation, verify
from rr_alloc.nn.pruning import Pruning
from rr_alloc.repair import RepairPipeline, RepairReport

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_library_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## Library\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = "\n".join(line for line in block.splitlines() if "MyNet" not in line)  # the user's own model
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "plan.json").is_file() and scope["plan"].verify["top1"] > 0


def test_allocate_and_verify_return_values_and_the_session_is_unchanged():
    session = Session(RunConfig(calib_size=64, selection_size=32), progress=False)
    before = {k: v.clone() for k, v in session.dense.state_dict().items()}
    alloc = allocate(session, "uniform", 0.8)
    assert isinstance(alloc, Allocation) and alloc.rule == "uniform" and alloc.search is None
    assert sum(alloc.counts.values()) == round(0.8 * sum(layer.n_weights for layer in session.layers))
    check = verify(session, alloc.counts, "bn", splits=("selection", "test"))
    assert isinstance(check, Verification) and set(check.metrics) == {"selection", "test"}
    assert check.report.calib_passes == 1
    assert all((session.dense.state_dict()[k] == v).all() for k, v in before.items())  # pruned copies only
    plan = build_plan(session, alloc, "bn")
    assert plan.counts == alloc.counts and plan.allocator == "uniform" and plan.repair == "bn"


def test_a_plan_repaired_again_on_a_session_is_a_fresh_copy_of_the_kept_result(monkeypatch):
    session = Session(RunConfig(calib_size=32, selection_size=16), progress=False)
    counts = allocate(session, "global", 0.7).counts
    runs = []
    real = evaluation.run_repair
    monkeypatch.setattr(evaluation, "run_repair", lambda *a, **k: runs.append(1) or real(*a, **k))
    first, _ = evaluation.repaired_model(session, counts, "lsq>bn")
    with torch.no_grad():
        for p in first.parameters():
            p.zero_()  # the caller's copy is its own: the kept result must not change
    again, report = evaluation.repaired_model(session, counts, "lsq>bn")
    evaluation.repaired_model(session, counts, "lsq")
    assert len(runs) == 2 and report.pipeline == "lsq>bn"  # the second lsq>bn came from the kept copy

    session.memo.clear()
    fresh, _ = evaluation.repaired_model(session, counts, "lsq>bn")
    assert len(runs) == 3
    for a, b in zip(again.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_the_kept_repaired_copies_are_bounded_least_recently_used_first_out():
    model, report = torch.nn.Linear(4, 4), RepairReport("bn")
    kept = evaluation.RepairedCopies(size=2)
    for key in "abc":
        kept.put(key, model, report)
    assert list(kept.kept) == ["b", "c"]
    kept.get("b")
    kept.put("d", model, report)
    assert list(kept.kept) == ["b", "d"]
    tiny = evaluation.RepairedCopies(max_bytes=16)  # smaller than one model: nothing is kept
    tiny.put("a", model, report)
    assert tiny.get("a") is None
    assert evaluation.RepairedCopies.key(Pruning(masks={"fc": torch.ones(4, 4)}), RepairPipeline()) is None
