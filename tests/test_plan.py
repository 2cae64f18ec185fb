"""Plan JSON: round trip, validation, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rr_alloc.errors import UserError
from rr_alloc.plans.plan import LayerPlan, Plan


def _plan() -> Plan:
    layers = [LayerPlan("conv1", 100, 432, (16, 3, 3, 3)), LayerPlan("fc", 10, 640, (10, 64))]
    p = Plan(layers, 0.1026, "rr-greedy", "bn>asr@block+logits")
    p.source = {"model": "cifar_resnet20", "checkpoint": None, "data": {"kind": "digits"}}
    p.verify = {"top1": 0.5, "agreement": 0.6, "kl": 1.2, "reference": {"allocator": "global", "top1": 0.4}}
    return p


def test_round_trip(tmp_path):
    p = _plan()
    path = p.save(tmp_path / "sub" / "plan.json")
    q = Plan.load(path)
    assert q.to_dict() == p.to_dict()
    d = json.loads(path.read_text())
    for key in ("budget", "achieved_sparsity", "allocator", "repair", "layers", "verify", "source"):
        assert key in d
    assert d["layers"][0] == {
        "name": "conv1",
        "sparsity": 100 / 432,
        "n_pruned": 100,
        "n_weights": 432,
        "shape": [16, 3, 3, 3],
    }
    assert d["achieved_sparsity"] == pytest.approx(110 / 1072)
    assert not list(tmp_path.rglob("*.tmp"))


def _broken(mutate):
    d = _plan().to_dict()
    mutate(d)
    return d


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(version=99), "schema version 99"),
        (lambda d: d.update(schema="other"), "not an rr_alloc plan"),
        (lambda d: d.update(unit="percent"), "unit"),
        (lambda d: d.pop("layers"), "lacks the key 'layers'"),
        (lambda d: d.update(layers=[]), "lists no layers"),
        (lambda d: d["layers"][0].update(sparsity=1.0, n_pruned=432), "outside \\[0, 1\\)"),
        (lambda d: d["layers"][0].update(sparsity=-0.1), "outside \\[0, 1\\)"),
        (lambda d: d["layers"][0].update(shape=[16, 3, 3]), "n_weights 432 but shape"),
        (lambda d: d["layers"][1].update(name="conv1"), "listed twice"),
        (lambda d: d["layers"][0].update(n_pruned=7), "inconsistent"),
        (lambda d: d["layers"][0].pop("n_weights"), "needs name, sparsity"),
        (lambda d: d.update(budget=2.0), "budget 2.0 outside"),
    ],
)
def test_malformed_plans_rejected(mutate, message):
    with pytest.raises(UserError, match=message):
        Plan.from_dict(_broken(mutate))


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Plan.load(bad)


def test_check_model_names_and_shapes():
    from torch import nn

    model = nn.Module()
    model.conv1 = nn.Conv2d(3, 16, 3)
    model.fc = nn.Linear(64, 10)
    _plan().check_model(model)
    model.fc = nn.Linear(32, 10)
    with pytest.raises(UserError, match="shape"):
        _plan().check_model(model)
    del model.fc
    with pytest.raises(UserError, match="not a layer of this model"):
        _plan().check_model(model)


def test_failed_write_keeps_old_plan(tmp_path, monkeypatch):
    """The write itself fails half-way (disk full): the good plan stays and no temporary file is left."""
    from pathlib import Path

    path = _plan().save(tmp_path / "plan.json")
    good = path.read_text()
    real_write = Path.write_text

    def half_then_fail(self, data, *a, **k):
        real_write(self, data[: len(data) // 2], *a, **k)  # bytes reach the disk, then the device is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    p = _plan()
    p.layers[0] = LayerPlan("conv1", 200, 432, (16, 3, 3, 3))
    with pytest.raises(OSError):
        p.save(path)
    monkeypatch.undo()
    assert path.read_text() == good and Plan.load(path).to_dict() == _plan().to_dict()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plan.json"]


def test_published_schema_is_the_declared_one():
    """docs/plan.schema.json is generated from rr_alloc.plans.schema (the one source)."""
    from pathlib import Path

    from rr_alloc.plans.schema import PLAN_SCHEMA

    published = Path(__file__).resolve().parents[1] / "docs" / "plan.schema.json"
    assert json.loads(published.read_text()) == PLAN_SCHEMA, (
        "regenerate it: python -m rr_alloc.plans.schema > docs/plan.schema.json"
    )


def test_written_plans_validate_against_the_published_schema(tmp_path):
    from pathlib import Path

    import jsonschema

    published = json.loads((Path(__file__).resolve().parents[1] / "docs" / "plan.schema.json").read_text())
    d = json.loads(_plan().save(tmp_path / "p.json").read_text())
    jsonschema.Draft202012Validator(published).validate(d)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(source="notadict"), "source: 'notadict' is not of type 'object'"),
        (lambda d: d.update(achieved_sparsity="abc"), "achieved_sparsity"),
        (lambda d: d["source"]["data"].update(calib_size="abc"), "source.data.calib_size"),
        (lambda d: d["source"].update(checkpoint_sha256="xyz"), "source.checkpoint_sha256"),
        (lambda d: d["verify"].update(top1="high"), "verify.top1"),
        (lambda d: d["layers"][0].update(name=""), "layers\\[0\\].name"),
    ],
)
def test_every_field_is_checked_against_the_schema(mutate, message):
    with pytest.raises(UserError, match=message):
        Plan.from_dict(_broken(mutate))


def test_non_utf8_and_nan_plans_are_one_line_errors(tmp_path):
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"schema": "rr_alloc.plan", "allocator": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        Plan.load(bad)
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(_plan().to_dict()).replace('"budget": 0.1026', '"budget": NaN'))
    with pytest.raises(UserError, match="NaN is not a JSON number"):
        Plan.load(nan)


STORED = Path(__file__).resolve().parent / "data" / "plans_v1_v2"


@pytest.mark.parametrize("name", ["global", "nm", "optuna", "flops"])
def test_stored_plans_of_schema_versions_1_and_2_load_and_round_trip(name, tmp_path):
    """Stored plans of every kind (v1 magnitude, v2 obs with N:M, a searched plan, a FLOP budget) load
    unchanged and save to the same JSON."""
    src = STORED / f"{name}.json"
    plan = Plan.load(src)
    assert plan.to_dict() == json.loads(src.read_text())
    assert Plan.load(plan.save(tmp_path / "again.json")).to_dict() == plan.to_dict()


def test_a_stored_nm_obs_plan_verifies_on_the_weights_it_was_made_from(capsys, tmp_path):
    """The stored plans were made with digits weights trained on another machine: their recorded fingerprint
    refuses today's shipped weights; the same plan without a fingerprint (an older build's) verifies."""
    from rr_alloc.cli import main

    assert main(["verify", "--plan", str(STORED / "nm.json")]) == 2
    assert "has other weights than the one the plan was made from" in capsys.readouterr().err
    d = json.loads((STORED / "nm.json").read_text())
    del d["source"]["model_fingerprint"]
    (tmp_path / "nm.json").write_text(json.dumps(d))
    assert main(["verify", "--plan", str(tmp_path / "nm.json")]) == 0
    assert "2:4 + repair" in capsys.readouterr().out
