"""Saving and loading repaired weights, including the per-channel affines some corrections need."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..system.files import atomic_path, write_text_atomic
from .affine import affine_modules, attach_output_affine

__all__ = ["save_pruned", "load_pruned", "spec_path"]


def spec_path(out: str | Path) -> Path:
    """The repair spec written beside ``out`` when output affines exist."""
    out = Path(out)
    return out.with_name(out.name + ".repair.json")


def save_pruned(model: nn.Module, out: str | Path, plan_path: str | None = None) -> Path | None:
    """Save a plain state_dict; when output affines exist, also a repair spec beside it.

    Returns the spec path (or ``None`` when every correction folded, so the file
    loads into the unmodified architecture).
    """
    with atomic_path(out) as tmp:
        torch.save(model.state_dict(), tmp)
    aff = affine_modules(model)
    spec = spec_path(out)
    if not aff:
        spec.unlink(missing_ok=True)
        return None
    body = {
        "format": "rr_alloc.repair_spec",
        "version": 1,
        "plan": plan_path,
        "affine": [{"module": n, "channels": a.scale.numel(), "channel_dim": a.channel_dim} for n, a in aff.items()],
    }
    write_text_atomic(spec, json.dumps(body, indent=2) + "\n")
    return spec


def load_pruned(model: nn.Module, path: str | Path, map_location: Any = "cpu") -> nn.Module:
    """Load ``rr_alloc apply``'s output into a fresh ``model``, re-attaching output affines from the spec."""
    spec = spec_path(path)
    if spec.exists():
        for a in json.loads(spec.read_text(encoding="utf-8"))["affine"]:
            attach_output_affine(model.get_submodule(a["module"]), int(a["channels"]), int(a["channel_dim"]))
    sd = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model.eval()
