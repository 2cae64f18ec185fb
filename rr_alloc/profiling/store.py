"""Content-addressed cache of RR profiles.

The key hashes everything the profile depends on: the model's weights and
buffers, the exact calibration tensors, the layer list, the grid and the
profile-repair settings. Each entry stores its own key and a checksum of its
payload; a corrupt or mismatching entry is reported and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..system.files import check_writable, write_text_atomic

__all__ = ["fingerprint_model", "fingerprint_tensor", "ProfileCache", "default_cache_dir", "usable_cache_dir"]

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """User cache directory: ``$RR_ALLOC_CACHE``, else ``$XDG_CACHE_HOME/rr_alloc`` (``~/.cache/rr_alloc``)."""
    env = os.environ.get("RR_ALLOC_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rr_alloc"


def usable_cache_dir(cache_dir: str | None) -> Path:
    """``cache_dir`` (else the default), checked before any work: a missing one must be creatable.

    An existing folder is used as it is (a read-only shared cache is still read).
    """
    d = Path(cache_dir) if cache_dir else default_cache_dir()
    if not d.is_dir():
        what = (
            "--cache-dir" if cache_dir else ("RR_ALLOC_CACHE" if os.environ.get("RR_ALLOC_CACHE") else "cache folder")
        )
        check_writable(d, what, is_dir=True)
    return d


def fingerprint_model(model: nn.Module) -> str:
    """SHA-256 over every state_dict entry's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(f"{k}|".encode())
        h.update(fingerprint_tensor(v).encode())
    return h.hexdigest()


def fingerprint_tensor(t: torch.Tensor) -> str:
    shape = tuple(t.shape)
    t = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}|{shape}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ProfileCache:
    """Profiles stored as JSON under ``root``, addressed by ``key(parts)``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        return _digest({"cache_version": CACHE_VERSION, **parts})

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored payload, or ``None`` when missing, corrupt or stale (then it is removed)."""
        p = self.path(key)
        if not p.is_file():  # missing, or a pipe or folder in its place (reading a pipe would block): a miss
            return None
        try:
            entry = json.loads(p.read_text(encoding="utf-8"))
            ok = entry.get("key") == key and entry.get("checksum") == _digest(entry["payload"])
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            p.unlink(missing_ok=True)
            return None
        return entry["payload"]

    def put(self, key: str, payload: dict[str, Any]) -> Path:
        entry = {"key": key, "checksum": _digest(payload), "payload": payload}
        return write_text_atomic(self.path(key), json.dumps(entry))
