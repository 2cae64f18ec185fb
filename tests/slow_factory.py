"""A tiny digits CNN whose forward sleeps, so an Optuna trial lasts long enough to kill its worker.

Tests pass it as ``--model slow_factory:factory`` (``tests/`` is on PYTHONPATH). Weights come from a
fixed seed, so every worker builds the same model and therefore keys the same study.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class SlowNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(os.environ.get("RR_ALLOC_SLOW_FORWARD_S", "0.2")))  # per batch
        return self.body(x)


def factory(num_classes: int = 10) -> nn.Module:
    g = torch.random.fork_rng()  # a fixed init without touching the caller's RNG
    with g:
        torch.manual_seed(0)
        return SlowNet(num_classes)
