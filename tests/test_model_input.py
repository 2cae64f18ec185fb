"""Models as users bring them: every torchvision family plans end to end, repair sites a model lacks are skipped
or refused by whether the user chose them, bad factories and non-finite outputs are one line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import QUICK, SLOW_FAMILIES, TV_FAMILIES, bad_search, small_folder

from rr_alloc.cli import main


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
    err = bad_search(
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


CHANNEL = {"convnext_tiny": "naive@block+logits"}  # the channel-wise repair; convnext has no BatchNorm to recalibrate


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FAMILIES else n for n in TV_FAMILIES]
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
            CHANNEL.get(name, "bn>naive@block+logits"),  # every family's sites; the re-fit is tested on small models
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
    err = bad_search(tmp_path, capsys, "--budget", "0.9", "--model", spec, *extra)
    assert spec in err and any(w in err for w in what.split("|")), err


# ------------------------------------------------------------------------------ models
def test_a_layer_that_never_runs_in_eval_mode_is_left_dense_and_named(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["search", "--budget", "0.8", "--model", "factories:aux_head_cnn", *QUICK, "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert "aux" not in [layer["name"] for layer in plan["layers"]]
    assert plan["source"]["left_dense"] == {"aux": "never runs in eval mode"}
    assert "left dense, never run in eval mode: aux" in capsys.readouterr().out


def test_the_default_repair_skips_what_a_model_lacks_and_still_plans(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["search", "--budget", "0.8", "--model", "factories:all_conv_net", *QUICK, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["verify"]["top1"] is not None
    notes = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(notes) == 1 and notes[0].startswith("note: repair step on block+logits skipped")


def test_a_model_with_non_finite_outputs_is_refused(tmp_path, capsys):
    from rr_alloc.models import build_model

    sd = build_model("cifar_resnet20").state_dict()
    key = next(k for k in sd if k.endswith("running_var"))
    sd[key] = -torch.ones_like(sd[key])  # a negative variance: NaN after the first BatchNorm
    ck = tmp_path / "negvar.th"
    torch.save(sd, ck)
    err = bad_search(
        tmp_path,
        capsys,
        "--budget",
        "0.9",
        "--model",
        "cifar_resnet20",
        "--checkpoint",
        str(ck),
        "--dataset",
        "imagefolder",
        "--train-data",
        str(small_folder(tmp_path)),
        "--test-data",
        str(small_folder(tmp_path)),
        "--calib-size",
        "4",
        "--selection-size",
        "2",
    )
    assert "non-finite outputs" in err
