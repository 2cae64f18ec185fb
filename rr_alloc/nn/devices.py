"""The torch device a run asks for."""

from __future__ import annotations

import torch

from ..errors import UserError

__all__ = ["resolve_device"]


def resolve_device(name: str):
    """``auto`` picks CUDA when present; an unavailable ``cuda`` is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)
