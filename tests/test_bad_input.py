"""Bad input and hostile files: each ends with one ``error:`` line, exit 2, no traceback and no file left
behind; generated files never run plan strings as code; outputs keep the permissions a plain open() gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from rr_alloc.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _one_error(capsys, code: int) -> str:
    """Assert the CLI's bad-input contract (exit 2, one ``error:`` line, no traceback); return the line."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _bad_search(tmp_path: Path, capsys, *args: str) -> str:
    out = tmp_path / "out" / "plan.json"
    code = main(["search", *args, "--out", str(out)])
    err = _one_error(capsys, code)
    assert not out.parent.exists() or not list(out.parent.iterdir())
    return err


# ---- output files keep the permissions a plain open() would give ----------------------------


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_follow_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "run" / "plan.json"
        assert main(["search", "--budget", "0.9", "--no-verify", "--out", str(out)]) == 0
        exp = out.parent / "exported.py"
        assert main(["export", "--plan", str(out), "--format", "torch-prune", "--out", str(exp)]) == 0
    finally:
        os.umask(old)
    files = [out, out.parent / "profile.csv", out.parent / "rr_curves.png", exp]
    for f in files:
        assert f.exists() and _mode(f) == 0o666 & ~umask, (f, oct(_mode(f)))
    for f in Path(os.environ["RR_ALLOC_CACHE"]).rglob("*"):  # cache entries are atomic writes too
        if f.is_file():
            assert _mode(f) & 0o600 == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o664])
def test_overwritten_file_keeps_its_mode(tmp_path, mode):
    out = tmp_path / "plan.json"
    out.write_text("{}")
    out.chmod(mode)
    old = os.umask(0o077)
    try:
        assert main(["search", "--budget", "0.9", "--no-verify", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.read_text() != "{}" and _mode(out) == mode
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left beside it


# ---- a checkpoint that would run code is refused without pointing at weights_only=False -----


class _RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    pass


def _checkpoint(kind: str, path: Path, marker: Path) -> None:
    if kind == "runs-code":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _RunsCode(marker)}, path)
    elif kind == "custom-class":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "cfg": _Custom()}, path)
    elif kind == "plain-object":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, path)
    elif kind == "garbage":
        path.write_bytes(b"\x80\x02garbage" * 16)
    elif kind == "truncated":
        torch.save({"w": torch.zeros(64)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["runs-code", "custom-class", "plain-object", "garbage", "truncated"])
def test_bad_checkpoint_never_suggests_unsafe_load(tmp_path, capsys, kind):
    marker = tmp_path / "executed"
    ck = tmp_path / "ck.pt"
    _checkpoint(kind, ck, marker)
    err = _bad_search(tmp_path, capsys, "--budget", "0.9", "--checkpoint", str(ck))
    assert "ck.pt" in err and "state_dict" in err
    for unsafe in ("weights_only=False", "likely succeed", "set to `False`", "add_safe_globals", "\x1b"):
        assert unsafe not in err
    assert not marker.exists()  # nothing in the file was executed
    if kind == "runs-code":
        assert "system" in err  # the refused global is named


# ---- non-finite weights are refused by name; plans never hold bare NaN -----------------------


def _strict_json(text: str):
    import json

    def refuse(token: str):
        raise AssertionError(f"invalid JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["weight", "bias", "running_var"])
def test_non_finite_checkpoint_is_refused(tmp_path, capsys, value, which):
    from rr_alloc.models import build_model

    sd = build_model("digits_resnet").state_dict()
    key = next(k for k in sd if k.endswith(which) and sd[k].is_floating_point())
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    ck = tmp_path / "ck.pt"
    torch.save(sd, ck)
    err = _bad_search(tmp_path, capsys, "--budget", "0.9", "--checkpoint", str(ck))
    assert key in err and "non-finite" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_plan_never_writes_nan(tmp_path, bad):
    from rr_alloc.plans.plan import LayerPlan, Plan

    plan = Plan(
        [LayerPlan("fc", 5, 10, (2, 5))],
        0.5,
        "global",
        "bn",
        verify={"top1": bad, "kl": bad, "reference": {"kl": bad, "agreement": 0.5}},
        profile={"grid": [0.5, bad]},
    )
    text = plan.save(tmp_path / "plan.json").read_text()
    d = _strict_json(text)
    assert d["verify"] == {"top1": None, "kl": None, "reference": {"kl": None, "agreement": 0.5}}
    assert d["profile"]["grid"] == [0.5, None]
    assert Plan.load(tmp_path / "plan.json").layers[0].n_pruned == 5


# ---- an image that cannot be decoded is named --------------------------------------------------


def _image_folder(root: Path, per_class: int = 8, size: int = 32, classes: int = 2, seed: int = 0) -> Path:
    """A synthetic ImageFolder: ``classes`` subfolders of random RGB images, alternating PNG and JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(px).save(d / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return root


def _corrupt(path: Path, how: str) -> Path:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, "PNG" if path.suffix == ".png" else "JPEG")
    data = buf.getvalue()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not an image" * 8, "empty": b""}[how])
    return path


@pytest.mark.parametrize(
    "name,how", [("bad.png", "truncated"), ("bad.jpg", "truncated"), ("bad.png", "garbage"), ("bad.jpg", "empty")]
)
def test_corrupt_image_is_named(tmp_path, capsys, name, how):
    data = _image_folder(tmp_path / "data")
    bad = _corrupt(data / "class1" / name, how)
    err = _bad_search(
        tmp_path,
        capsys,
        "--budget",
        "0.9",
        "--model",
        "cifar_resnet20",
        "--dataset",
        "imagefolder",
        "--train-data",
        str(data),
        "--test-data",
        str(data),
        "--calib-size",
        "8",
        "--selection-size",
        "4",
    )
    assert str(bad) in err and "corrupt or truncated" in err


# ---- plan strings never become code or YAML keys ---------------------------------------------


def _touch_code(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def _payloads(marker: Path) -> dict[str, str]:
    code = _touch_code(marker)
    return {
        "newline": f"x\n{code}\n",
        "cr": f"x\r{code}\r",
        "u2028": f"x\u2028{code}",
        "docstring": f'x"""; {code}; """',
        "yaml-key": "x\ninjected: 1\nmodifiers: []",
    }


def _simple_plan(**kw):
    from rr_alloc.plans.plan import LayerPlan, Plan

    layers = [LayerPlan(kw.pop("layer", "conv"), 5, 10, (2, 5)), LayerPlan("fc", 3, 10, (10,))]
    return Plan(
        layers,
        0.5,
        kw.pop("allocator", "global"),
        "bn",
        budget_unit=kw.pop("budget_unit", "weights"),
        source={"model": kw.pop("model", "digits_resnet")},
    )


@pytest.mark.parametrize("payload", ["newline", "cr", "u2028", "yaml-key"])
@pytest.mark.parametrize("field", ["allocator", "model", "budget_unit", "layer"])
def test_plan_with_control_characters_is_refused_at_load(tmp_path, capsys, field, payload):
    marker = tmp_path / "executed"
    plan = tmp_path / "plan.json"
    _simple_plan(**{field: _payloads(marker)[payload]}).save(plan)
    for fmt in ("torch-prune", "sparseml"):
        out = tmp_path / f"out_{fmt}"
        err = _one_error(capsys, main(["export", "--plan", str(plan), "--format", fmt, "--out", str(out)]))
        assert "control character" in err or "budget_unit" in err
        assert not out.exists() and not marker.exists()


@pytest.mark.parametrize("payload", ["newline", "cr", "u2028", "docstring", "yaml-key"])
@pytest.mark.parametrize("fmt", ["torch-prune", "torch-pruning", "llm-compressor", "sparseml"])
def test_export_quotes_plan_strings(tmp_path, fmt, payload):
    import runpy

    import yaml

    from rr_alloc.plans.export import export_plan

    marker = tmp_path / "executed"
    bad = _payloads(marker)[payload]
    plan = _simple_plan(allocator=bad, model=bad, budget_unit=bad, layer=bad)
    names = [l.name for l in plan.layers]
    out = export_plan(plan, fmt, tmp_path / ("gen.py" if fmt.startswith("torch") else "gen.yaml"))
    text = out.read_text()
    if fmt.startswith("torch"):
        mod = runpy.run_path(str(out))  # importing the generated module runs nothing from the plan
        assert not marker.exists()
        if fmt == "torch-prune":
            assert list(mod["COUNTS"]) == names
        else:
            assert list(mod["CHANNEL_RATIOS"]) == names[:-1] and mod["IGNORED"] == names[-1:]
        return
    assert not any(l.startswith(("injected", "modifiers: []")) for l in text.splitlines())

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor(
        "!GMPruningModifier", lambda l, node: {"GMPruningModifier": l.construct_mapping(node, deep=True)}
    )
    doc = yaml.load(text, Loader=Loader)
    if fmt == "llm-compressor":
        assert list(doc) == ["sparsity_stage"]
        assert doc["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]["targets"] == names
    else:
        assert list(doc) == ["modifiers"] and len(doc["modifiers"]) == 1
        gm = doc["modifiers"][0]["GMPruningModifier"]
        assert sorted(p for ps in gm["final_sparsity"].values() for p in ps) == sorted(f"{n}.weight" for n in names)


# ---- residual blocks found by a recorded forward; a missing site kind is skipped ------------


def test_untraceable_blocks_are_found():
    from factories import branchy_net

    from rr_alloc.repair import discover_sites

    model = branchy_net().eval()
    x = torch.randn(2, 1, 8, 8)
    assert [s.name for s in discover_sites(model, ("block",), x)] == ["block1", "block2"]


@pytest.mark.parametrize("factory,note", [("branchy_net", False), ("plain_vgg", True), ("tiny_digits_cnn", True)])
def test_default_pipeline_runs_on_the_sites_a_model_has(tmp_path, capsys, factory, note):
    import json

    out = tmp_path / "plan.json"
    code = main(
        [
            "search",
            "--budget",
            "0.8",
            "--model",
            f"factories:{factory}",
            "--calib-size",
            "64",
            "--selection-size",
            "32",
            "--out",
            str(out),
        ]
    )
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "Traceback" not in cap.err and "error" not in cap.err
    notes = [l for l in cap.out.splitlines() if l.startswith("note: repair sites")]
    assert len(notes) == (1 if note else 0), notes  # one line, said once
    if note:
        assert "no residual blocks" in notes[0] and "logits" in notes[0]
    assert json.loads(out.read_text())["achieved_sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_a_step_with_no_site_at_all_is_refused(tmp_path, capsys):
    err = _bad_search(
        tmp_path,
        capsys,
        "--budget",
        "0.8",
        "--model",
        "factories:plain_vgg",
        "--repair",
        "asr@block",
        "--calib-size",
        "64",
        "--selection-size",
        "32",
    )
    assert "'block' does not exist" in err and "--repair" in err


# the smallest variant of each family, random weights; VGG-11-BN with a narrow classifier (the stock one
# holds 119 M weights and takes ~5 min on 2 cores, tests/factories.py); convnext_tiny takes ~30 s
_SLOW_FAMILIES = {"convnext_tiny"}
TV_FAMILIES = [
    "resnet18",
    "factories:vgg11_bn_small",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_y_400mf",
    "densenet121",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
]


@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    data = _image_folder(root / "data", per_class=16, size=32)
    cfg = root / "cfg.yaml"  # no resize/crop: the images stay 32x32, so every family runs in seconds
    cfg.write_text("transform: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}\n")
    return data, cfg


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_FAMILIES else n for n in TV_FAMILIES]
)
def test_torchvision_family_sweep(tmp_path, capsys, tiny_imagefolder, name):
    import json

    data, cfg = tiny_imagefolder
    out = tmp_path / "plan.json"
    threads = torch.get_num_threads()
    code = main(
        [
            "search",
            "--budget",
            "0.5",
            "--model",
            name,
            "--num-classes",
            "10",
            "--config",
            str(cfg),
            "--dataset",
            "imagefolder",
            "--train-data",
            str(data),
            "--test-data",
            str(data),
            "--calib-size",
            "16",
            "--selection-size",
            "8",
            "--eval-size",
            "8",
            "--batch-size",
            "8",
            "--threads",
            "1",
            "--repair",
            "bn>naive@block+logits",  # the sites of every family; the default's re-fit is tested on smaller models
            "--out",
            str(out),
        ]
    )  # one thread: these small convs lose time to a second one
    torch.set_num_threads(threads)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "Traceback" not in cap.err and "error" not in cap.err
    plan = json.loads(out.read_text())
    assert plan["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert plan["verify"]["reference"]  # the plan and its reference were both verified


# ---- a plan file alone never makes rr_alloc import code ---------------------------------------

_EVIL = """import os, pathlib
pathlib.Path(os.environ["RR_EVIL_MARKER"]).touch()  # importing this module is the attack


def factory(num_classes=10):
    pathlib.Path(os.environ["RR_EVIL_MARKER"] + ".called").touch()
    raise SystemExit("called")
"""


@pytest.fixture(scope="module")
def factory_plan(tmp_path_factory) -> Path:
    """A small plan made with --model factories:tiny_digits_cnn (the spec tests then replace)."""
    out = tmp_path_factory.mktemp("fplan") / "plan.json"
    assert (
        main(
            [
                "search",
                "--budget",
                "0.8",
                "--model",
                "factories:tiny_digits_cnn",
                "--calib-size",
                "64",
                "--selection-size",
                "32",
                "--no-verify",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def _with_model(plan: Path, model: str, dest: Path) -> Path:
    import json

    d = json.loads(plan.read_text())
    d["source"]["model"] = model
    dest.write_text(json.dumps(d))
    return dest


def _replay(cmd: str, plan: Path, out: Path, *extra: str) -> list[str]:
    if cmd == "verify":
        return ["verify", "--plan", str(plan), *extra]
    if cmd == "apply":
        return ["apply", "--plan", str(plan), "--out", str(out), *extra]
    return ["export", "--plan", str(plan), "--format", cmd.split(":")[1], "--out", str(out), *extra]


EXPORT_FORMATS = [
    "masks",
    "torch-pruning",
    "csv",
    "markdown",
    "torch-prune",
    "nni",
    "nni-v2",
    "sparseml",
    "llm-compressor",
]
REPLAY_CMDS = ["verify", "apply"] + [f"export:{f}" for f in EXPORT_FORMATS]


@pytest.mark.parametrize("spec", ["evil_plan_mod:factory", "tempfile:mkdtemp", "this:x", "os:system"])
@pytest.mark.parametrize("cmd", REPLAY_CMDS)
def test_plan_model_code_is_refused(tmp_path, capsys, monkeypatch, factory_plan, spec, cmd):
    import sys
    import tempfile

    marker = tmp_path / "executed"
    (tmp_path / "evil_plan_mod.py").write_text(_EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("RR_EVIL_MARKER", str(marker))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdirs"))  # where mkdtemp would create a folder
    (tmp_path / "tmpdirs").mkdir()
    had_this = "this" in sys.modules
    plan = _with_model(factory_plan, spec, tmp_path / "plan.json")
    out = tmp_path / "out" / "result"
    err = _one_error(capsys, main(_replay(cmd, plan, out)))
    assert spec in err and "--trust-plan-model" in err and "--model" in err
    assert not out.exists() and not out.parent.exists()
    assert not marker.exists() and not Path(str(marker) + ".called").exists()  # nothing imported or called
    assert "evil_plan_mod" not in sys.modules and ("this" in sys.modules) == had_this
    assert not list((tmp_path / "tmpdirs").iterdir())


@pytest.mark.parametrize("how", ["cli-model", "trust-flag"])
def test_plan_model_code_runs_when_the_caller_says_so(tmp_path, capsys, factory_plan, how):
    extra = ["--model", "factories:tiny_digits_cnn"] if how == "cli-model" else ["--trust-plan-model"]
    out = tmp_path / "masks.pt"
    assert main(_replay("export:masks", factory_plan, out, *extra)) == 0, capsys.readouterr().err
    assert out.exists()


@pytest.mark.parametrize("model", ["digits_resnet", "torchvision:resnet18", "resnet18"])
def test_zoo_and_torchvision_names_need_no_trust(tmp_path, capsys, model):
    from rr_alloc.plans.replay import check_plan_model

    plan = _simple_plan(model=model)
    check_plan_model(plan, model, None, False)  # no error: these names import no user code
    with pytest.raises(Exception, match="trust-plan-model"):
        check_plan_model(_simple_plan(model="pkg.mod:f"), "pkg.mod:f", None, False)
    check_plan_model(_simple_plan(model="pkg.mod:f"), "pkg.mod:f", "pkg.mod:f", False)
    check_plan_model(_simple_plan(model="pkg.mod:f"), "digits_resnet", "digits_resnet", False)  # overridden


# ---- a factory that needs arguments, raises or returns a non-module is one line ---------------


@pytest.mark.parametrize(
    "spec,what",
    [
        ("os:system", "TypeError"),
        ("factories:raises", "weights file missing"),
        ("factories:returns_none", "NoneType"),
        ("os:getcwd", "str|TypeError"),
        ("factories:ToyNotThere", "no attribute"),
    ],
)
@pytest.mark.parametrize("num_classes", [None, "10"])
def test_bad_factory_is_one_line(tmp_path, capsys, spec, what, num_classes):
    extra = [] if num_classes is None else ["--num-classes", num_classes]
    err = _bad_search(tmp_path, capsys, "--budget", "0.9", "--model", spec, *extra)
    assert spec in err and any(w in err for w in what.split("|")), err


# ---- every export format checks the plan's layers and checkpoint hash ------------------------


@pytest.fixture(scope="module")
def checkpoint_plan(tmp_path_factory) -> tuple[Path, Path]:
    """A plan made from a checkpoint file (the digits model's own weights)."""
    from rr_alloc.models import build_model

    d = tmp_path_factory.mktemp("ckplan")
    ck = d / "ck.pt"
    torch.save(build_model("digits_resnet").state_dict(), ck)
    out = d / "plan.json"
    assert (
        main(
            [
                "search",
                "--budget",
                "0.8",
                "--checkpoint",
                str(ck),
                "--calib-size",
                "64",
                "--selection-size",
                "32",
                "--no-verify",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out, ck


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
@pytest.mark.parametrize("tamper", ["unknown-layer", "wrong-shape", "checkpoint-changed"])
def test_every_export_checks_layers_and_checkpoint(tmp_path, capsys, checkpoint_plan, fmt, tamper):
    import json
    import shutil

    plan_path, ck0 = checkpoint_plan
    ck = tmp_path / "ck.pt"
    shutil.copy(ck0, ck)
    d = json.loads(plan_path.read_text())
    d["source"]["checkpoint"] = str(ck)
    if tamper == "unknown-layer":
        d["layers"][0]["name"] = "no_such_layer"
    elif tamper == "wrong-shape":
        d["layers"][0]["shape"] = [1, 2, 3, 4]
    else:
        sd = torch.load(ck, weights_only=True)
        k = next(iter(sd))
        sd[k] = sd[k] + 1
        torch.save(sd, ck)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(d))
    out = tmp_path / "out" / "exported"
    err = _one_error(capsys, main(["export", "--plan", str(plan), "--format", fmt, "--out", str(out)]))
    assert {"unknown-layer": "no_such_layer", "wrong-shape": "shape", "checkpoint-changed": "SHA-256"}[tamper] in err
    assert not out.exists() and not out.parent.exists()


# ---- unwritable outputs are refused before any work; DIR/ means DIR/plan.json -----------------


def _unwritable(tmp_path: Path, where: str) -> Path:
    """An output path that cannot be written: under a file, or under /proc."""
    if where == "under-file":
        f = tmp_path / "a_file"
        f.write_text("x")
        return f / "sub" / "result"
    return Path("/proc") / "rr_alloc_test" / "result"


@pytest.mark.parametrize("where", ["under-file", "under-proc", "existing-dir"])
@pytest.mark.parametrize("cmd", ["search", "apply", "export", "compare"])
def test_unwritable_output_fails_before_work(tmp_path, capsys, checkpoint_plan, cmd, where):
    if where == "existing-dir":
        if cmd == "search":
            pytest.skip("search writes DIR/plan.json into an existing folder (tested below)")
        target = tmp_path / "exists"
        target.mkdir()
        if cmd == "compare":  # an output folder that is a file
            target = tmp_path / "exists_file"
            target.write_text("x")
    else:
        target = _unwritable(tmp_path, where)
    before = sorted(tmp_path.rglob("*"))
    argv = {
        "search": ["search", "--budget", "0.9", "--out", str(target)],
        "apply": ["apply", "--plan", str(checkpoint_plan[0]), "--out", str(target)],
        "export": ["export", "--plan", str(checkpoint_plan[0]), "--format", "csv", "--out", str(target)],
        "compare": ["compare", "--budgets", "0.9", "--allocators", "uniform", "--out-dir", str(target)],
    }[cmd]
    code = main(argv)
    out = capsys.readouterr()
    assert out.out == ""  # refused before any work
    err = out.err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert ("--out-dir" if cmd == "compare" else "--out") in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, probes removed


@pytest.mark.parametrize("where", ["under-file", "under-proc"])
def test_unwritable_cache_fails_before_work(tmp_path, capsys, monkeypatch, where):
    monkeypatch.setenv("RR_ALLOC_CACHE", str(_unwritable(tmp_path, where)))
    err = _bad_search(tmp_path, capsys, "--budget", "0.9")
    assert "RR_ALLOC_CACHE" in err


@pytest.mark.parametrize("how", ["existing-dir", "trailing-slash"])
def test_search_out_folder_means_plan_json(tmp_path, capsys, how):
    d = tmp_path / "run"
    if how == "existing-dir":
        d.mkdir()
    arg = str(d) + ("/" if how == "trailing-slash" else "")
    assert (
        main(["search", "--budget", "0.9", "--no-verify", "--calib-size", "64", "--selection-size", "32", "--out", arg])
        == 0
    ), capsys.readouterr().err
    assert (d / "plan.json").is_file() and (d / "profile.csv").is_file()


# ---- numbers out of range are one line, named by their flag -----------------------------------


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--threads", "-1"], "--threads"),
        (["--threads", "0"], "--threads"),
        (["--grid", "nan", "0.99"], "--grid"),
        (["--grid", "0.5", "inf"], "--grid"),
        (["--s-max", "nan"], "--s-max"),
        (["--calib-size", "0"], "--calib-size"),
        (["--calib-size", "1"], "--calib-size) must be a whole number >= 2"),
        (["--seed", "-1"], "--seed"),
        (["--num-classes", "0"], "--num-classes"),
    ],
)
def test_bad_numbers_are_one_line(tmp_path, capsys, args, flag):
    err = _bad_search(tmp_path, capsys, "--budget", "0.9", *args)
    assert flag in err


# ---- the Optuna path --------------------------------------------------------------

_OPTUNA = ["--allocator", "optuna", "--calib-size", "64", "--selection-size", "32", "--no-verify"]


@pytest.mark.parametrize(
    "args", [["--n-trials", "-1"], ["--timeout", "-1"], ["--n-trials", "0"], ["--n-trials", "0", "--timeout", "nan"]]
)
def test_bad_trial_counts_leave_nothing(tmp_path, capsys, args):
    err = _bad_search(tmp_path, capsys, "--budget", "0.9", *_OPTUNA, *args)
    assert "--n-trials" in err or "--timeout" in err
    assert not (tmp_path / "out").exists()  # no half-initialised optuna.db, no empty folder


def test_zero_trials_writes_the_best_trial(tmp_path, capsys):
    import json

    import optuna

    out = tmp_path / "run" / "plan.json"
    assert main(["search", "--budget", "0.9", *_OPTUNA, "--n-trials", "2", "--out", str(out)]) == 0
    storage = f"sqlite:///{out.parent / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    n = len(optuna.load_study(study_name=name, storage=storage).trials)
    first = json.loads(out.read_text())
    out.unlink()
    assert main(["search", "--budget", "0.9", *_OPTUNA, "--n-trials", "0", "--out", str(out)]) == 0
    assert len(optuna.load_study(study_name=name, storage=storage).trials) == n  # no trial added
    assert json.loads(out.read_text())["layers"] == first["layers"]  # the study's best trial


@pytest.mark.parametrize(
    "args,what",
    [
        (["--repair", "bogus"], "bogus"),
        (["--reference", "bogus"], "bogus"),
        (["--calib-size", "100000"], "exceed"),
        (["--checkpoint", "missing.pt"], "missing.pt"),
        (["--model", "no_such_model"], "no_such_model"),
        (["--storage", "x.txt"], "x.txt"),
    ],
)
def test_bad_input_with_optuna_leaves_no_folder(tmp_path, capsys, args, what):
    base = _OPTUNA if "--calib-size" not in args else [a for a in _OPTUNA if a not in ("--calib-size", "64")]
    err = _bad_search(tmp_path, capsys, "--budget", "0.9", *base, "--n-trials", "1", *args)
    assert what in err
    assert not (tmp_path / "out").exists()


def test_summary_survives_other_studies(tmp_path, capsys):
    import optuna

    out = tmp_path / "run" / "plan.json"
    out.parent.mkdir()
    storage = f"sqlite:///{out.parent / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=storage, study_name="empty")
    s = optuna.create_study(storage=storage, study_name="failed")
    s.tell(s.ask(), state=optuna.trial.TrialState.FAIL)
    s = optuna.create_study(storage=storage, study_name="multi", directions=["minimize", "minimize"])
    s.tell(s.ask(), [1.0, 2.0])
    optuna.create_study(storage=storage, study_name="running").ask()
    code = main(["search", "--budget", "0.9", *_OPTUNA, "--n-trials", "1", "--out", str(out)])
    cap = capsys.readouterr()
    assert code == 0 and "Traceback" not in cap.err, cap.err
    lines = [l for l in cap.out.splitlines() if l.startswith("optuna study") and "completed trials" in l]
    assert len(lines) == 5 and all(f"study {n}:" in cap.out for n in ("empty", "failed", "multi", "running"))


def test_ctrl_c_in_a_trial_is_one_line(tmp_path, capsys, monkeypatch):
    from rr_alloc.search.scoring import SelectionScorer

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(SelectionScorer, "score", interrupt)  # inside the first trial's evaluation
    code = main(["search", "--budget", "0.9", *_OPTUNA, "--n-trials", "3", "--out", str(tmp_path / "r" / "plan.json")])
    err = capsys.readouterr().err
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l]  # minus progress bars
    assert code == 130 and lines == ["error: interrupted"], err
    assert not (tmp_path / "r" / "plan.json").exists()


# ---- config and plan values are type-checked; the config's out: key is honoured ---------------


@pytest.mark.parametrize(
    "line,key",
    [
        ("calib_size: abc", "calib_size"),
        ("grid: abc", "grid"),
        ("device: 5", "device"),
        ("seed: [1, 2]", "seed"),
        ("batch_size: 1.5", "batch_size"),
        ("pretrained: 'yes'", "pretrained"),
        ("include: [1, 2]", "include"),
        ("transform: [1, 2]", "transform"),
        ("model: ''", "model"),
        ("s_max: .inf", "s_max"),
        ("n_trials: -3", "n_trials"),
        ("transform: {mean: abc}", "transform mean"),
        ("transform: {mean: [0.5], std: [0]}", "transform std"),
        ("transform: {resize: big}", "transform resize"),
    ],
)
def test_config_values_are_type_checked(tmp_path, capsys, line, key):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(line + "\n")
    err = _bad_search(tmp_path, capsys, "--budget", "0.9", "--config", str(cfg))
    assert err.startswith((f"error: {key} ", f"error: config key '{key}' "))  # the latter: keys with no flag


@pytest.mark.parametrize(
    "field,value", [("calib_size", "abc"), ("seed", [1, 2]), ("batch_size", 0), ("eval_size", "all")]
)
@pytest.mark.parametrize("cmd", ["verify", "apply", "export:csv"])
def test_plan_values_are_type_checked(tmp_path, capsys, checkpoint_plan, field, value, cmd):
    import json

    d = json.loads(checkpoint_plan[0].read_text())
    if field == "batch_size":
        d["source"][field] = value
    else:
        d["source"]["data"][field] = value
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(d))
    out = tmp_path / "out" / "result"
    err = _one_error(capsys, main(_replay(cmd, plan, out)))
    assert field in err and not out.parent.exists()


def test_config_out_key_is_used(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"out: {tmp_path / 'from_config'}/\ncalib_size: 64\nselection_size: 32\n")
    assert main(["search", "--budget", "0.9", "--no-verify", "--config", str(cfg)]) == 0, capsys.readouterr().err
    assert (tmp_path / "from_config" / "plan.json").is_file()
