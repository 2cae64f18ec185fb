"""Shared fixtures: tiny CPU models and a per-session cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import QUICK, image_folder
from torch import nn

from rr_alloc.cli import main

SHARED = Path(os.environ.get("RR_ALLOC_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Keep the digits model and profiles of the test run out of the user's cache."""
    d = os.environ.get("RR_ALLOC_TEST_CACHE") or str(tmp_path_factory.mktemp("rr_cache"))
    old = os.environ.get("RR_ALLOC_CACHE")
    os.environ["RR_ALLOC_CACHE"] = d
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield d
    if old is None:
        os.environ.pop("RR_ALLOC_CACHE", None)
    else:
        os.environ["RR_ALLOC_CACHE"] = old


class ToyNet(nn.Module):
    """BN, a residual connection, stride 2, a grouped conv, a biased conv and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.block = ToyBlock()
        self.conv3 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=True)
        self.bn3 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.block(x)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)) + x)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture
def toy() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(ToyNet())


@pytest.fixture
def toy_batches():
    """Unequal batch sizes on purpose (streaming must not assume equal batches)."""
    g = torch.Generator().manual_seed(1)
    sizes = [7, 16, 3, 10]
    return [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in sizes]


@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    data = image_folder(root / "data", per_class=16, size=32)
    cfg = root / "cfg.yaml"  # no resize/crop: the images stay 32x32, so every family runs in seconds
    cfg.write_text("transform: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}\n")
    return data, cfg


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


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A plan from ``search --budget 0.9`` on the embedded default."""
    out = tmp_path_factory.mktemp("good") / "plan.json"
    assert main(["search", "--budget", "0.9", "--no-verify", *QUICK, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def nm_plan(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nm") / "plan.json"
    # magnitude masks within each group of 4 (the channel-wise repair): the masks an export must reproduce
    argv = ["search", "--pattern", "2:4", "--no-verify", "--repair", "bn>naive@block+logits", *QUICK, "--out", str(out)]
    assert main(argv) == 0
    return out
