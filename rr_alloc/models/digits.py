"""The embedded default: a small residual CNN on scikit-learn's bundled digits.

scikit-learn ships the 1,797 8x8 handwritten digits of the UCI set inside its
wheel, so the default run needs no download. The network is trained once on
first use (seeded, about ten seconds on two CPU cores) and cached.

The model deliberately exercises the code paths of a real ResNet: BatchNorm
after every conv, identity and projection (1x1 conv) residual shortcuts, a
stride-2 stage and a Linear classifier: 7 prunable layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import default_cache_dir
from ..data import digits_arrays, digits_split_indices
from ..io_utils import atomic_path
from .cifar_resnet import BasicBlock

__all__ = ["DigitsResNet", "pretrained_digits_resnet"]

_TRAIN_SEED = 0
_EPOCHS = 30
_VERSION = 1  # bump when the architecture or training recipe changes


class DigitsResNet(nn.Module):
    """stem conv -> BasicBlock(16) -> BasicBlock(16->32, stride 2, projection) -> linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16, 1))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2, option="B"))
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _train(model: DigitsResNet, x: torch.Tensor, y: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(_TRAIN_SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = _EPOCHS * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(_EPOCHS):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            # one-pixel random shifts: cheap augmentation for an 8x8 input
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            xb = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def pretrained_digits_resnet(verbose: bool = True, cache_dir: str | Path | None = None) -> DigitsResNet:
    """The default model, trained on the digits training pool on first use and cached in ``cache_dir``."""
    path = Path(cache_dir or default_cache_dir()) / f"digits_resnet-v{_VERSION}-seed{_TRAIN_SEED}.pt"
    model = DigitsResNet()
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception:  # corrupt cache: retrain below and overwrite
            pass
    if verbose:
        print(f"training the embedded digits model once (cached at {path}) ...", flush=True)
    x, y = digits_arrays()
    train_idx, _ = digits_split_indices(len(x))
    torch.manual_seed(_TRAIN_SEED)
    model = DigitsResNet()
    with torch.random.fork_rng():
        torch.manual_seed(_TRAIN_SEED)
        _train(model, x[train_idx], y[train_idx])
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval()
