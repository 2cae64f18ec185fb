"""Models users bring: timm models (``--model timm:NAME``), ``.safetensors`` checkpoints, and convolutions
that pad their input inside their own forward (TF-style "same" padding)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import bad_search, image_folder
from torch import nn

from rr_alloc.cli import main
from rr_alloc.repair.refit import input_patches, output_rows

timm = pytest.importorskip("timm")

TF_MODEL = "tf_mobilenetv3_small_minimal_100"  # five timm Conv2dSame layers (padding done in forward)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    data = image_folder(root / "data", per_class=12, classes=2)
    cfg = root / "c.yaml"  # keep the 32 px images as they are (timm's own transform would upscale to 224)
    cfg.write_text("transform: {mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}\n")
    return data, cfg


def _run(folder, *extra: str) -> list[str]:
    data, cfg = folder
    return [
        *("--config", str(cfg), "--dataset", "imagefolder", "--train-data", str(data), "--test-data", str(data)),
        *("--calib-size", "12", "--selection-size", "6", "--num-classes", "2", *extra),
    ]


def _conv_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    seen = {}

    def hook(name):
        def record(mod, inp, out) -> None:  # returns None: a forward hook's value would replace the output
            seen.setdefault(name, (mod, inp[0].clone(), out.clone()))  # before in-place activations

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_patches_reproduce_every_conv_output_of_a_tf_same_padding_model():
    torch.manual_seed(0)
    model = timm.create_model(TF_MODEL, num_classes=4).double().eval()
    seen = _conv_inputs(model, torch.randn(2, 3, 33, 31, dtype=torch.float64))  # odd sizes: asymmetric pads
    same = [n for n, (m, _, _) in seen.items() if type(m).__name__ == "Conv2dSame"]
    assert same, "the model has TF-style same-padding convolutions"
    for name, (mod, x, y) in seen.items():
        if mod.groups != 1:
            continue
        got = input_patches(mod, x) @ mod.weight.flatten(1).T + (mod.bias if mod.bias is not None else 0)
        assert torch.allclose(got, output_rows(mod, y), atol=1e-10), name


@pytest.mark.parametrize("padding", ["same", 2, (1, 0)])
def test_patches_of_padding_forms_of_nn_conv2d(padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 4), padding=padding, dilation=(1, 2) if padding == "same" else 1).double()
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    got = input_patches(conv, x) @ conv.weight.flatten(1).T + conv.bias
    assert torch.allclose(got, output_rows(conv, conv(x)), atol=1e-10)


def test_a_timm_tf_model_reconstructs_with_obs_and_meets_the_budget(folder, tmp_path, capsys):
    torch.manual_seed(0)  # timm's random initialisation
    out = tmp_path / "plan.json"
    args = ["search", "--budget", "0.5", "--model", f"timm:{TF_MODEL}", "--repair", "obs>bn>naive@block+logits"]
    assert main([*args, *_run(folder), "--out", str(out)]) == 0, capsys.readouterr().err
    plan = json.loads(out.read_text())
    pruned = sum(layer["n_pruned"] for layer in plan["layers"])
    assert pruned == round(0.5 * sum(layer["n_weights"] for layer in plan["layers"]))
    assert plan["mask_rule"] == "obs" and plan["source"]["model"] == f"timm:{TF_MODEL}"


def test_timm_names_are_no_code_and_unknown_names_are_one_line(folder, tmp_path, capsys):
    from rr_alloc.plans.replay import is_code_spec

    assert not is_code_spec(f"timm:{TF_MODEL}")
    err = bad_search(tmp_path, capsys, "--budget", "0.5", "--model", "timm:no_such_net", *_run(folder))
    assert "unknown timm model 'no_such_net'" in err


def test_a_missing_timm_is_one_line_naming_the_extra(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    err = bad_search(tmp_path, capsys, "--budget", "0.5", "--model", f"timm:{TF_MODEL}", *_run(folder))
    assert '".[timm]"' in err


def test_timms_own_transform_is_the_default(tmp_path):
    from rr_alloc.models import build_model, default_transform

    model = build_model(f"timm:{TF_MODEL}")
    tf = default_transform(f"timm:{TF_MODEL}", model=model)
    assert (tf.resize, tf.crop, tf.mean) == (256, 224, (0.5, 0.5, 0.5))


def test_safetensors_checkpoints_load_and_a_corrupt_one_is_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    from rr_alloc.models import build_model

    torch.manual_seed(0)
    ck = tmp_path / "digits.safetensors"
    model = build_model("digits_resnet", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck))
    out = tmp_path / "plan.json"
    args = ["search", "--budget", "0.9", "--checkpoint", str(ck), "--calib-size", "64", "--selection-size", "32"]
    assert main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    plan = json.loads(out.read_text())
    assert plan["source"]["checkpoint"] == str(ck) and len(plan["source"]["checkpoint_sha256"]) == 64
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(ck.read_bytes()[:1000])
    err = bad_search(tmp_path, capsys, "--budget", "0.9", "--checkpoint", str(bad))
    assert "as safetensors" in err and "corrupt or truncated" in err


def test_random_weights_are_the_same_in_every_build_and_leave_the_callers_random_state():
    from rr_alloc.models import build_model

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = build_model("resnet18", 10), build_model("resnet18", 10)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
