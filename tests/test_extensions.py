"""Extension points: an allocator, a repair step, a search optimiser and a model source, each written as one
file outside the package (``tests/extensions/``) and registered by its own decorator, run ``search`` end to end.

Each test registers its extension for its own duration: the registries are restored afterwards, so the rest of
the suite sees only the built-in kinds.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from rr_alloc.allocators import ALLOCATORS
from rr_alloc.cli import main
from rr_alloc.models.sources import SOURCES
from rr_alloc.repair.steps import STEP_KINDS
from rr_alloc.search.optimizers import OPTIMIZERS

EXTENSIONS = Path(__file__).parent / "extensions"
QUICK = ("--calib-size", "64", "--selection-size", "32")


@pytest.fixture
def extension():
    """Run an extension's file (its decorator registers it); the registries are restored afterwards."""
    saved = [(r, dict(r)) for r in (ALLOCATORS, STEP_KINDS, OPTIMIZERS, SOURCES)]

    def load(name: str) -> None:
        runpy.run_path(str(EXTENSIONS / f"{name}.py"))

    yield load
    for registry, before in saved:
        registry.clear()
        registry.update(before)


def _search(tmp_path: Path, capsys, *args: str) -> dict:
    out = tmp_path / "plan.json"
    code = main(["search", "--out", str(out), *QUICK, *args])
    assert code == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def test_an_allocator_from_outside_the_package_plans_and_is_listed(extension, tmp_path, capsys):
    extension("toy_allocator")
    plan = _search(tmp_path, capsys, "--budget", "0.8", "--allocator", "toy-ends-dense")
    layers = plan["layers"]
    assert plan["allocator"] == "toy-ends-dense" and layers[0]["n_pruned"] == 0 and layers[-1]["n_pruned"] == 0
    assert sum(l["n_pruned"] for l in layers) == round(0.8 * sum(l["n_weights"] for l in layers))
    assert main(["list"]) == 0 and "toy-ends-dense" in capsys.readouterr().out


def test_a_repair_step_from_outside_the_package_composes_and_replays(extension, tmp_path, capsys):
    extension("toy_repair_step")
    plan = _search(tmp_path, capsys, "--budget", "0.8", "--repair", "bn>shrink:f=0.9>naive@block+logits")
    assert plan["repair"] == "bn>shrink:f=0.9>naive@block+logits" and plan["verify"]["repair"] == plan["repair"]
    assert main(["verify", "--plan", str(tmp_path / "plan.json")]) == 0
    assert f"{100 * plan['verify']['top1']:.2f}" in capsys.readouterr().out  # the replay gives the same figure
    assert main(["search", "--budget", "0.8", "--repair", "shrink:f=2", *QUICK, "--out", str(tmp_path / "b.json")]) == 2
    assert "shrink:f=X with X in (0, 1]" in capsys.readouterr().err


def test_an_optimiser_from_outside_the_package_searches(extension, tmp_path, capsys):
    extension("toy_optimizer")
    storage = f"sqlite:///{(tmp_path / 'optuna.db').resolve()}"
    plan = _search(
        tmp_path,
        capsys,
        *("--budget", "0.8", "--allocator", "optuna", "--optimizer", "toy-mix", "--n-trials", "4"),
        *("--storage", storage, "--no-verify"),
    )
    assert plan["search"]["optimizer"] == "toy-mix" and plan["search"]["complete"] == 4
    assert plan["search"]["best_selection"] <= plan["search"]["global_selection"]  # from the best rule


def test_a_model_source_from_outside_the_package_builds_plans_and_replays(extension, tmp_path, capsys):
    extension("toy_source")
    plan = _search(tmp_path, capsys, "--budget", "0.8", "--model", "toy:wide")
    assert plan["source"]["model"] == "toy:wide" and {l["name"] for l in plan["layers"]} == {"0", "3", "8"}
    assert main(["verify", "--plan", str(tmp_path / "plan.json")]) == 0  # no code runs: no opt-in asked
    out = tmp_path / "c.json"
    assert main(["search", "--budget", "0.8", "--model", "toy:huge", *QUICK, "--out", str(out)]) == 2
    assert "use toy:narrow or toy:wide" in capsys.readouterr().err and not out.exists()
