"""Level database: every layer reconstructed at a ladder of sparsity levels, stitched into candidates.

For each Conv2d/Linear layer the reconstruction step of the run's repair (``obs`` or ``lsq``) is solved at
every level of a ladder of pruned counts, from dense to ``s_max``: the keep-mask, the re-fitted kept
weights and the bias move (the layer's new bias, or the running-mean move of the BatchNorm it feeds). A
search candidate is one level per layer; *stitching* copies those entries into the dense model, which then
goes through the cheap rest of the pipeline (BatchNorm recalibration, the channel-wise step) instead of a
full sequential reconstruction.

Which inputs each layer's levels are fitted on is the *input rule*:

- ``dense``: the dense network's inputs (``X_p = X_d``): layers are independent, one pass builds all;
- ``anchor``: the inputs of the anchor plan (global magnitude at the run's budget) reconstructed
  sequentially, as the full pipeline would: one sequential pass builds all levels, and a candidate at the
  anchor's levels *is* the full pipeline's reconstruction;
- ``uniform`` (EvoPress): level ``j`` of every layer is fitted inside the model pruned uniformly at level
  ``j`` and reconstructed sequentially: one sequential pass per level.

The ladder is geometric in density (each level keeps ``1 - step`` of the previous level's weights), so a
search move is a constant relative change at any sparsity; the anchor's counts are levels too. Entries are
stored compactly: packed keep bits, the kept weights' values (``float16`` or ``float32``) and one move per
output channel.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..nn.layers import reconstructed_layers
from ..nn.pruning import apply_masks, magnitude_mask
from ..repair.reconstruct import ReconstructStep, bias_targets, fit_groups, reconstruct
from ..repair.refit import GramStats
from ..system.files import atomic_path

__all__ = [
    "INPUT_RULES",
    "DEFAULT_LADDER_STEP",
    "ladder",
    "LevelDatabase",
    "build_database",
    "LevelCache",
    "reconstructed_layers",
]

INPUT_RULES = ("dense", "anchor", "uniform")
DEFAULT_LADDER_STEP = 0.1  # each level keeps 90% of the previous level's weights
DB_VERSION = 1


def ladder(n: int, s_max: float, step: float = DEFAULT_LADDER_STEP, extra: Sequence[int] = ()) -> np.ndarray:
    """Pruned counts of a layer of ``n`` weights: ``0``, ``n (1 - (1 - step)^j)`` up to ``floor(n s_max)``,
    and ``extra`` (the anchor's counts), sorted and unique."""
    kmax = int(np.floor(n * s_max + 1e-9))
    counts = {0, kmax}
    density = 1.0
    while True:
        density *= 1.0 - step
        k = int(round(n * (1.0 - density)))
        if k >= kmax:
            break
        counts.add(k)
    counts.update(int(k) for k in extra if 0 <= int(k) <= kmax)
    return np.array(sorted(counts), np.int64)


def level_index(ladder: np.ndarray, count: int, name: str = "the layer") -> int:
    """The level of ``count`` pruned weights on a layer's ``ladder`` (it must be on it)."""
    i = int(np.searchsorted(ladder, count))
    if i >= len(ladder) or ladder[i] != count:
        raise KeyError(f"{count} pruned weights of {name} is not a level of the ladder")
    return i


@dataclass
class LevelDatabase:
    """Per layer: the ladder of pruned counts and, per level, packed keep bits, kept values and the move."""

    counts: dict[str, np.ndarray]
    bits: dict[str, list[np.ndarray]]
    values: dict[str, list[torch.Tensor]]
    moves: dict[str, list[torch.Tensor | None]]
    targets: dict[str, str | None]  # "bias", the BatchNorm the layer feeds, or None (no move)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.counts)

    def level_of(self, name: str, count: int) -> int:
        """The level index of ``count`` pruned weights of ``name`` (it must be on the ladder)."""
        return level_index(self.counts[name], count, name)

    def levels_of(self, counts: Mapping[str, int]) -> dict[str, int]:
        """Level indices of per-layer counts (layers not named stay at their count-0 level)."""
        return {n: self.level_of(n, int(counts.get(n, 0))) for n in self.names}

    @property
    def nbytes(self) -> int:
        """Bytes held: packed bits, values and moves."""
        total = 0
        for n in self.names:
            total += sum(b.nbytes for b in self.bits[n])
            total += sum(v.numel() * v.element_size() for v in self.values[n])
            total += sum(m.numel() * m.element_size() for m in self.moves[n] if m is not None)
        return total

    def keep(self, dense: nn.Module, name: str, level: int) -> torch.Tensor:
        """The keep-mask of ``name`` at ``level``."""
        w = dense.get_submodule(name).weight
        flat = np.unpackbits(self.bits[name][level], count=w.numel()).astype(bool)
        return torch.from_numpy(flat).to(w.device).view_as(w)

    def write(self, model: nn.Module, dense: nn.Module, name: str, level: int) -> torch.Tensor:
        """Set ``model.<name>`` (and its bias target) to the entry at ``level``; returns its keep-mask."""
        entry = self.bits[name][level], self.values[name][level], self.moves[name][level]
        return _write_entry(model, dense, name, self.targets[name], *entry)

    def stitch(self, dense: nn.Module, levels: Mapping[str, int]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """A copy of ``dense`` with every layer at its level (``levels``: layer -> level index)."""
        model = copy.deepcopy(dense)
        masks = {n: self.write(model, dense, n, int(levels[n])) for n in self.names}
        return model, masks

    # ------------------------------------------------------------- storage
    def state(self) -> dict[str, Any]:
        """Plain tensors and lists (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "version": DB_VERSION,
            "counts": {n: torch.from_numpy(c) for n, c in self.counts.items()},
            "bits": {n: [torch.from_numpy(b) for b in bs] for n, bs in self.bits.items()},
            "values": self.values,
            "moves": self.moves,
            "targets": self.targets,
            "meta": json.dumps(self.meta),
        }

    @classmethod
    def from_state(cls, s: Mapping[str, Any]) -> "LevelDatabase":
        if s.get("version") != DB_VERSION:
            raise ValueError("level database of another version")
        return cls(
            counts={n: c.numpy() for n, c in s["counts"].items()},
            bits={n: [b.numpy() for b in bs] for n, bs in s["bits"].items()},
            values=dict(s["values"]),
            moves=dict(s["moves"]),
            targets=dict(s["targets"]),
            meta=json.loads(s["meta"]),
        )


class _LevelFitter:
    """Fits the requested levels of each layer from its Gram pairs (a reconstruction observer), then writes
    the level the sequential pass continues from (``write``: layer -> count; absent: the layer stays)."""

    def __init__(
        self,
        dense: nn.Module,
        pruned: nn.Module,
        step: ReconstructStep,
        targets: dict[str, str | None],
        want: Mapping[str, Sequence[int]],
        write: Mapping[str, int],
        dtype: torch.dtype,
    ) -> None:
        self.dense, self.pruned, self.step, self.targets = dense, pruned, step, targets
        self.want, self.write, self.dtype = want, write, dtype
        self.scratch = copy.deepcopy(dense)
        self.entries: dict[tuple[str, int], tuple[np.ndarray, torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def fit(self, name: str, grams: list[GramStats], count: int) -> tuple[np.ndarray, torch.Tensor, Any]:
        """The entry of ``name`` at ``count`` pruned weights, re-fitted on ``grams``."""
        layer, dl = self.scratch.get_submodule(name), self.dense.get_submodule(name)
        target = self.targets.get(name)
        keep0 = magnitude_mask(dl.weight, count)
        layer.weight.copy_(dl.weight * keep0)
        if target == "bias":
            layer.bias.copy_(dl.bias)
        elif target:
            self.scratch.get_submodule(target).running_mean.copy_(self.dense.get_submodule(target).running_mean)
        keep = fit_groups(name, self.scratch, dl, grams, keep0, self.step, target)
        return _entry(self.scratch, self.dense, name, target, keep, self.dtype)

    def __call__(self, name: str, grams: list[GramStats]) -> None:
        for count in self.want.get(name, ()):
            if (name, int(count)) not in self.entries:
                self.entries[name, int(count)] = self.fit(name, grams, int(count))
        if name in self.write:
            bits, values, move = self.entries[name, int(self.write[name])]
            _write_entry(self.pruned, self.dense, name, self.targets.get(name), bits, values, move)


def _entry(
    model: nn.Module, dense: nn.Module, name: str, target: str | None, keep: torch.Tensor, dtype: torch.dtype
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None]:
    """``(packed keep bits, kept values, move)`` of ``model.<name>`` (a move against ``dense``)."""
    layer = model.get_submodule(name)
    bits = np.packbits(keep.flatten().cpu().numpy())
    values = layer.weight.detach()[keep].to("cpu", dtype).clone()
    mdtype = torch.promote_types(dtype, torch.float32)  # one value per channel: never below float32
    if target == "bias":
        move = layer.bias.detach().to("cpu", mdtype).clone()
    elif target:
        move = (dense.get_submodule(target).running_mean - model.get_submodule(target).running_mean).to("cpu", mdtype)
    else:
        move = None
    return bits, values, move


@torch.no_grad()
def _write_entry(
    model: nn.Module,
    dense: nn.Module,
    name: str,
    target: str | None,
    bits: np.ndarray,
    values: torch.Tensor,
    move: torch.Tensor | None,
) -> torch.Tensor:
    """Set ``model.<name>`` to one stored entry (and its bias or BatchNorm move); returns its keep-mask."""
    layer = model.get_submodule(name)
    w = torch.zeros_like(layer.weight)
    flat = np.unpackbits(bits, count=w.numel()).astype(bool)
    keep = torch.from_numpy(flat).to(w.device).view_as(w)
    w[keep] = values.to(w.device, w.dtype)
    layer.weight.copy_(w)
    if move is not None and target == "bias":
        layer.bias.copy_(move.to(layer.bias.device, layer.bias.dtype))
    elif move is not None and target:
        bn, dense_bn = model.get_submodule(target), dense.get_submodule(target)
        bn.running_mean.copy_(dense_bn.running_mean - move.to(bn.running_mean.device, bn.running_mean.dtype))
    return keep


def build_database(
    dense: nn.Module,
    batches: Any,
    ladders: Mapping[str, np.ndarray],
    step: ReconstructStep,
    rule: str,
    anchor: Mapping[str, int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> LevelDatabase:
    """Reconstruct every layer of ``ladders`` (layer -> pruned counts) at every count under input ``rule``.

    ``anchor``: per-layer pruned counts of the anchor plan (on the ladders); ``dtype``: of the stored values.
    Layers the reconstruction cannot fit keep magnitude-pruned dense weights (``meta["unfitted"]``).
    """
    if rule not in INPUT_RULES:
        raise ValueError(f"unknown input rule {rule!r}: use {', '.join(INPUT_RULES)}")
    t0 = time.perf_counter()
    targets = bias_targets(dense)
    names = list(ladders)
    entries: dict[tuple[str, int], Any] = {}
    passes = 0

    def run(counts: Mapping[str, int] | None, want: Mapping[str, Sequence[int]], write: Mapping[str, int]) -> None:
        nonlocal passes
        pruned = copy.deepcopy(dense)
        if counts is not None:
            apply_masks(pruned, {n: magnitude_mask(pruned.get_submodule(n).weight, int(counts[n])) for n in names})
        fitter = _LevelFitter(dense, pruned, step, targets, want, write, dtype)
        fitter.entries = entries  # shared: a later pass does not refit what an earlier one stored
        reconstruct(pruned, dense, batches, names, step, device=device, progress=progress, observer=fitter)
        passes += 1

    if rule == "dense":  # the pruned model stays dense: every layer sees the dense inputs
        run(None, {n: list(ladders[n]) for n in names}, {})
    elif rule == "anchor":
        run(anchor, {n: list(ladders[n]) for n in names}, {n: int(anchor[n]) for n in names})
    else:
        run(anchor, {n: [int(anchor[n])] for n in names}, {n: int(anchor[n]) for n in names})
        depth = max(len(ladders[n]) for n in names)
        for j in range(depth):  # level j everywhere (the top level for layers with shorter ladders)
            counts = {n: int(ladders[n][min(j, len(ladders[n]) - 1)]) for n in names}
            log(f"level database (uniform inputs): level {j + 1}/{depth}")
            run(counts, {n: [counts[n]] for n in names}, counts)
    return _assemble(dense, ladders, entries, targets, dtype, rule, step, passes, time.perf_counter() - t0)


def _assemble(dense, ladders, entries, targets, dtype, rule, step, passes, seconds) -> LevelDatabase:
    """The database from fitted entries; a layer the reconstruction skipped gets magnitude-pruned weights."""
    bits, values, moves, unfitted = {}, {}, {}, []
    for n, ks in ladders.items():
        bits[n], values[n], moves[n] = [], [], []
        for k in ks:
            e = entries.get((n, int(k)))
            if e is None:
                if n not in unfitted:
                    unfitted.append(n)
                keep = magnitude_mask(dense.get_submodule(n).weight, int(k))
                e = _entry(dense, dense, n, None, keep, dtype)
            bits[n].append(e[0])
            values[n].append(e[1])
            moves[n].append(e[2])
    db = LevelDatabase(dict(ladders), bits, values, moves, {n: targets.get(n) for n in ladders})
    db.meta = {
        "input_rule": rule,
        "repair": str(step),
        "levels": int(sum(len(k) for k in ladders.values())),
        "passes": passes,
        "build_seconds": round(seconds, 2),
        "dtype": str(dtype).replace("torch.", ""),
        "unfitted": unfitted,
    }
    db.meta["megabytes"] = round(db.nbytes / 2**20, 2)
    return db


class LevelCache:
    """Level databases stored as ``torch.save`` files under ``root``, addressed by a content key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(parts: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps({"db_version": DB_VERSION, **parts}, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / f"{key[:32]}.pt"

    def get(self, key: str) -> LevelDatabase | None:
        """The stored database, or ``None`` when missing, unreadable or another key's (then it is removed)."""
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
            ok = state.get("key") == key
            db = LevelDatabase.from_state(state) if ok else None
        except Exception:  # any unreadable file is a cache miss, never a crash
            db = None
        if db is None:
            p.unlink(missing_ok=True)
        return db

    def put(self, key: str, db: LevelDatabase) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.path(key)
        with atomic_path(p) as tmp:
            torch.save({"key": key, **db.state()}, tmp)
        return p
