"""Files any command reads or writes: hostile checkpoints never run code, corrupt images are named, folders and
pipes given as files are named, and written files keep the permissions a plain open() gives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import bad_search, corrupt, file_mode, hostile_checkpoint, image_folder, refused

from rr_alloc.cli import main


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
        assert f.exists() and file_mode(f) == 0o666 & ~umask, (f, oct(file_mode(f)))
    for f in Path(os.environ["RR_ALLOC_CACHE"]).rglob("*"):  # cache entries are atomic writes too
        if f.is_file():
            assert file_mode(f) & 0o600 == 0o600


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
    assert out.read_text() != "{}" and file_mode(out) == mode
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left beside it


@pytest.mark.parametrize("kind", ["runs-code", "custom-class", "plain-object", "garbage", "truncated"])
def test_bad_checkpoint_never_suggests_unsafe_load(tmp_path, capsys, kind):
    marker = tmp_path / "executed"
    ck = tmp_path / "ck.pt"
    hostile_checkpoint(kind, ck, marker)
    err = bad_search(tmp_path, capsys, "--budget", "0.9", "--checkpoint", str(ck))
    assert "ck.pt" in err and "state_dict" in err
    for unsafe in ("weights_only=False", "likely succeed", "set to `False`", "add_safe_globals", "\x1b"):
        assert unsafe not in err
    assert not marker.exists()  # nothing in the file was executed
    if kind == "runs-code":
        assert "system" in err  # the refused global is named


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
    err = bad_search(tmp_path, capsys, "--budget", "0.9", "--checkpoint", str(ck))
    assert key in err and "non-finite" in err


@pytest.mark.parametrize(
    "name,how", [("bad.png", "truncated"), ("bad.jpg", "truncated"), ("bad.png", "garbage"), ("bad.jpg", "empty")]
)
def test_corrupt_image_is_named(tmp_path, capsys, name, how):
    data = image_folder(tmp_path / "data")
    bad = corrupt(data / "class1" / name, how)
    err = bad_search(
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


# ------------------------------------------------------------------- checkpoints and sizes
@pytest.mark.parametrize("dtype", [torch.int8, torch.complex64])
def test_quantised_or_complex_checkpoints_are_refused(tmp_path, capsys, dtype):
    from rr_alloc.models import build_model

    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in build_model("cifar_resnet20").state_dict().items()}
    ck = tmp_path / "ck.pt"
    torch.save(sd, ck)
    err = bad_search(tmp_path, capsys, "--budget", "0.9", "--model", "cifar_resnet20", "--checkpoint", str(ck))
    assert str(dtype).replace("torch.", "") in err and "floating-point checkpoint" in err


def test_inputs_that_are_folders_or_pipes_are_named(tmp_path, capsys):
    assert "is a folder" in refused(capsys, ["search", "--budget", "0.9", "--config", str(tmp_path) + "/"])
    args = ["search", "--budget", "0.9", "--model", "cifar_resnet20", "--checkpoint", str(tmp_path) + "/"]
    assert "is a folder" in refused(capsys, args)
    r, w = os.pipe()
    try:
        err = refused(capsys, ["verify", "--plan", f"/proc/self/fd/{r}"])
    finally:
        os.close(r)
        os.close(w)
    assert "named pipe" in err
