"""A plan's checkpoint and data paths: written relative to the plan's folder, resolved from it on load, so a
plan folder moved with its model and data replays anywhere."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["paths_relative_to", "paths_resolved_from"]

_PATH_KEYS = (("checkpoint",), ("data", "train"), ("data", "test"))


def _map_paths(source: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of a plan's ``source`` with ``fn`` applied to its relative checkpoint and data paths."""
    out = copy.deepcopy(source)
    for keys in _PATH_KEYS:
        block: Any = out
        for k in keys[:-1]:
            block = block.get(k) if isinstance(block, dict) else None
        value = block.get(keys[-1]) if isinstance(block, dict) else None
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
            block[keys[-1]] = fn(value)
    return out


def paths_relative_to(source: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """``source`` as written into a plan in ``folder``: relative paths become relative to that folder."""
    if not source:
        return source
    base = os.path.abspath(folder)
    return {**_map_paths(source, lambda v: os.path.relpath(os.path.abspath(v), base)), "paths": "plan"}


def paths_resolved_from(source: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """``source`` as read from a plan in ``folder``: its paths usable from the working directory again."""
    out = _map_paths(source, lambda v: os.path.normpath(os.path.join(folder, v)))
    out.pop("paths", None)
    return out
