"""House rules and small helpers: import contracts, hooks, sensitivity, MACs, checkpoints, config, N:M plans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rr_alloc.cli import main
from rr_alloc.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """No import cycle, no upward import, the library never imports the CLI (pyproject.toml contracts)."""
    # through the interpreter, not the lint-imports script: a fresh environment may not have it on PATH yet
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_importing_the_library_pulls_no_cli_module():
    code = "import rr_alloc, sys; print([m for m in sys.modules if m.startswith('rr_alloc.cli')])"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_forward_hooks_remove_and_restore_mode_on_error():
    from rr_alloc.nn.hooks import forward_hooks

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).train()

    def boom(m, i, o):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        with forward_hooks(model, {"0": boom}):
            assert not model.training
            model(torch.zeros(1, 3))
    assert model.training and not model[0]._forward_hooks


class _DeadBranch(nn.Module):
    """``b``'s output is multiplied by zero: no noise there can reach the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.a(x) + 0.0 * self.b(x)
        return self.fc(y.mean((2, 3)))


def test_output_sensitivity_measures_what_reaches_the_logits():
    from rr_alloc.nn.layers import prunable_layers
    from rr_alloc.profiling.sensitivity import output_sensitivity

    torch.manual_seed(0)
    model = _DeadBranch().train()
    layers = prunable_layers(model)
    batches = [(torch.randn(16, 3, 6, 6), torch.zeros(16))]
    s = output_sensitivity(model, layers, batches, eps=0.05)
    names = [l.name for l in layers]
    assert s[names.index("b")] == 0.0 and s[names.index("a")] > 0 and s[names.index("fc")] > 0
    assert s.mean() == pytest.approx(1.0)
    np.testing.assert_array_equal(s, output_sensitivity(model, layers, batches, eps=0.05))  # same seed
    assert model.training and all(not m._forward_hooks for m in model.modules())


def test_layer_macs_on_grouped_and_strided_convs():
    from rr_alloc.nn.layers import layer_macs, prunable_layers

    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # depthwise, 10x10 -> 5x5
        nn.Conv2d(8, 16, 1, groups=2),  # grouped pointwise, 5x5
        nn.Conv2d(16, 4, 3),  # valid conv, 3x3
        nn.Flatten(),
        nn.Linear(36, 7),
    )
    layers = prunable_layers(model)
    a = layer_macs(model, layers, torch.randn(2, 8, 10, 10))
    np.testing.assert_array_equal(a, [25, 25, 9, 1])  # each weight is used once per output position
    # against a brute-force MAC count of each layer
    brute = [8 * 1 * 9 * 25, 16 * 4 * 25, 4 * 16 * 9 * 9, 7 * 36]
    np.testing.assert_array_equal(a * [l.n_weights for l in layers], brute)


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


def test_config_expands_environment_variables(tmp_path, monkeypatch):
    from rr_alloc.config.files import load_config_file

    monkeypatch.setenv("RR_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("RR_TEST_NAME", "w")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("checkpoint: ${RR_TEST_ROOT}/$RR_TEST_NAME.th\ntrain_data: ~/data\ngrid: [0.5, 0.99]\n")
    kw = load_config_file(cfg)
    assert kw["checkpoint"] == f"{tmp_path}/w.th" and kw["train_data"] == f"{tmp_path}/home/data"
    assert kw["grid"] == (0.5, 0.99)
    cfg.write_text("checkpoint: ${RR_TEST_SURELY_UNSET}/x\n")
    with pytest.raises(UserError, match="RR_TEST_SURELY_UNSET"):
        load_config_file(cfg)


def test_nm_pattern_from_the_command_line(tmp_path, capsys):
    from rr_alloc import load_pruned
    from rr_alloc.models.digits import DigitsResNet

    out = tmp_path / "plan.json"
    assert main(["search", "--pattern", "2:4", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["version"] == 2 and d["pattern"] == "2:4" and d["allocator"] == "2:4"
    for l in d["layers"]:  # the project's grouping: 4 input channels at one kernel position, 2 kept
        want = l["n_weights"] // 2 if l["shape"][1] % 4 == 0 else 0
        assert l["n_pruned"] == want, l["name"]
    capsys.readouterr()
    assert main(["verify", "--plan", str(out)]) == 0
    assert f"{100 * d['verify']['top1']:.2f}" in capsys.readouterr().out
    assert main(["apply", "--plan", str(out), "--out", str(tmp_path / "p.pt")]) == 0
    model = load_pruned(DigitsResNet(), tmp_path / "p.pt")
    for l in d["layers"]:
        w = model.get_submodule(l["name"]).weight
        if l["n_pruned"]:
            g = (w != 0).movedim(1, -1)
            g = g.reshape(*g.shape[:-1], g.shape[-1] // 4, 4)
            assert bool((g.sum(-1) <= 2).all()), l["name"]


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--pattern", "2:4", "--budget", "0.9"], "exactly one"),
        ([], "exactly one"),
        (["--pattern", "4:2"], "0 < N < M"),
        (["--pattern", "two"], "N:M"),
    ],
)
def test_bad_pattern_is_one_line(tmp_path, capsys, args, msg):
    out = tmp_path / "plan.json"
    assert main(["search", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and msg in err
    assert not list(tmp_path.iterdir())
