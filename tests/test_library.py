"""The library API: the README's example runs as written, and the spine's functions return their results."""

from __future__ import annotations

import re
from pathlib import Path

from rr_alloc import Allocation, RunConfig, Session, Verification, allocate, build_plan, verify

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
