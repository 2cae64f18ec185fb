"""The embedded default: a small residual CNN on scikit-learn's bundled digits.

scikit-learn ships the 1,797 8x8 handwritten digits of the UCI set inside its
wheel, so the default run needs no download. The trained weights ship inside
this package (``digits_resnet.safetensors``, 83 KB): training is seeded but not
bit-for-bit the same on every CPU, and shipped weights make the default run
print the same figures everywhere. ``studies/train_digits.py`` retrains them
with ``train_digits_resnet`` and rewrites the file.

The model deliberately exercises the code paths of a real ResNet: BatchNorm
after every conv, identity and projection (1x1 conv) residual shortcuts, a
stride-2 stage and a Linear classifier: 7 prunable layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.splits import digits_arrays, digits_split_indices
from .cifar_resnet import BasicBlock

__all__ = ["DigitsResNet", "pretrained_digits_resnet", "train_digits_resnet", "WEIGHTS"]

TRAIN_SEED = 0
EPOCHS = 30
WEIGHTS = Path(__file__).with_name("digits_resnet.safetensors")


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
    g = torch.Generator().manual_seed(TRAIN_SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps = EPOCHS * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(EPOCHS):
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


def train_digits_resnet() -> DigitsResNet:
    """A digits model trained from seed ``TRAIN_SEED`` on the digits training pool (the test pool unseen)."""
    x, y = digits_arrays()
    train_idx, _ = digits_split_indices(len(x))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)
        model = DigitsResNet()
        _train(model, x[train_idx], y[train_idx])
    return model


def pretrained_digits_resnet() -> DigitsResNet:
    """The default model with the weights shipped in the package (tensors only, no code is unpickled)."""
    from safetensors.torch import load_file

    model = DigitsResNet()
    model.load_state_dict(load_file(WEIGHTS))
    return model.eval()
