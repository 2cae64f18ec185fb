"""Checkpoints in unusual forms: sparse tensors load as the same numbers; meta-device and quantised tensors
are refused in one line with no warning before it."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_cli import run_cli
from torch import nn

from rr_alloc.models import build_model


@pytest.fixture(scope="module")
def state():
    return build_model("digits_resnet", None, False).state_dict()


def _search(tmp_path, ckpt):
    out = tmp_path / "run" / "plan.json"
    return run_cli("search", "--budget", "0.9", "--checkpoint", str(ckpt), "--out", str(out)), out


def test_a_sparse_checkpoint_gives_the_dense_ones_figures(tmp_path, state):
    torch.save({k: v.to_sparse() if v.dim() > 1 else v for k, v in state.items()}, tmp_path / "sparse.pt")
    torch.save(state, tmp_path / "dense.pt")
    (a, _), (b, _) = _search(tmp_path / "a", tmp_path / "sparse.pt"), _search(tmp_path / "b", tmp_path / "dense.pt")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout.split("\n\n")[1:3] == b.stdout.split("\n\n")[1:3]  # the layer table and the totals


def _quantised(v):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(v.float(), 0.1, 0, torch.qint8)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda v: torch.empty_like(v, device="meta"), "on the meta device"),
        (lambda v: _quantised(v) if v.is_floating_point() and v.dim() > 1 else v, "as a quantised tensor"),
    ],
)
def test_tensors_without_plain_values_are_refused_in_one_line(tmp_path, state, make, words):
    torch.save({k: make(v) for k, v in state.items()}, tmp_path / "c.pt")
    r, out = _search(tmp_path, tmp_path / "c.pt")
    assert r.returncode == 2 and words in r.stderr and not out.exists(), r.stderr
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1  # no warning before the line


def test_an_old_format_checkpoint_loads_without_warnings(tmp_path, state):
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    r, _ = _search(tmp_path, tmp_path / "old.pt")
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr


def test_float8_weights_load_as_their_values_and_nested_tensors_are_refused(tmp_path, state):
    f8 = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() and v.dim() > 1 else v for k, v in state.items()}
    torch.save(f8, tmp_path / "f8.pt")
    r, out = _search(tmp_path / "a", tmp_path / "f8.pt")
    assert r.returncode == 0 and out.exists(), r.stderr
    nested = dict(state)
    nested["conv1.weight"] = torch.nested.nested_tensor([state["conv1.weight"][0], state["conv1.weight"][1]])
    torch.save(nested, tmp_path / "nested.pt")
    r, out = _search(tmp_path / "b", tmp_path / "nested.pt")
    assert r.returncode == 2 and "as a nested tensor" in r.stderr and not out.exists(), r.stderr


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module.", "_orig_mod.", "old_bn"])
def test_checkpoint_wrappers_and_prefixes(tmp_path, wrap):
    from rr_alloc.models import load_checkpoint

    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    sd = dict(src.state_dict())
    if wrap in ("module.", "_orig_mod."):
        sd = {wrap + k: v for k, v in sd.items()}
    if wrap == "old_bn":  # PyTorch < 0.4.1 checkpoints have no num_batches_tracked
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    obj = {wrap: sd, "epoch": 3} if wrap in ("state_dict", "model") else sd
    torch.save(obj, tmp_path / "ck.pt")
    dst = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    load_checkpoint(dst, tmp_path / "ck.pt")
    torch.testing.assert_close(dst[0].weight, src[0].weight)
