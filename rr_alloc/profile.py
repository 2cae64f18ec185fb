"""Relative Repairability profile: one streaming pass over the calibration set.

For every prunable layer ``l`` and grid sparsity ``s`` the layer alone is
magnitude-pruned and fed the *dense* network's input. Instead of rerunning
the network per (layer, s), a forward hook takes each layer's dense input
once and evaluates all grid points in a single batched call on the *removed*
weights: ``e = y_p - y_d = -f(x; W * (1 - M_s))`` (the bias cancels), which is
both cheaper and exact (no cancellation between ``y_p`` and ``y_d``).

Cost: one dense forward plus, per layer, one call with ``G`` times its output
channels, about ``(1 + G)`` dense forwards for a grid of ``G`` sparsities.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .layers import LayerInfo, prunable_layers
from .pruning import magnitude_order, n_pruned
from .stats import JointMoments, as_bcx, distortions

__all__ = ["DEFAULT_GRID", "RRProfile", "profile_rr", "removed_weight_stack", "grid_outputs",
           "validate_grid"]

DEFAULT_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


@dataclass
class RRProfile:
    """``D_raw``, ``D_res`` and ``RR`` for every layer x grid sparsity (arrays ``(L, G)``)."""

    layers: list[LayerInfo]
    grid: np.ndarray
    d_raw: np.ndarray
    d_res: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def n_weights(self) -> np.ndarray:
        return np.array([l.n_weights for l in self.layers], dtype=np.int64)

    @property
    def rr(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.d_raw > 0, self.d_res / self.d_raw, 1.0)

    def curve(self, key: str = "d_res") -> tuple[np.ndarray, np.ndarray]:
        """Grid with 0 prepended, and the ``(L, G+1)`` curve (0 at sparsity 0)."""
        vals = getattr(self, key) if key != "rr" else self.rr
        s = np.concatenate([[0.0], self.grid])
        first = np.zeros((len(self.layers), 1)) if key != "rr" else np.ones((len(self.layers), 1))
        return s, np.concatenate([first, vals], axis=1)

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per layer x grid point."""
        rows = []
        rr = self.rr
        for i, l in enumerate(self.layers):
            for j, s in enumerate(self.grid):
                rows.append({"layer": l.name, "n_weights": l.n_weights, "sparsity": float(s),
                             "d_raw": float(self.d_raw[i, j]), "d_res": float(self.d_res[i, j]),
                             "rr": float(rr[i, j])})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [{"name": l.name, "shape": list(l.shape), "n_weights": l.n_weights,
                            "kind": l.kind, "groups": l.groups} for l in self.layers],
                "grid": self.grid.tolist(), "d_raw": self.d_raw.tolist(), "d_res": self.d_res.tolist(),
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RRProfile":
        layers = [LayerInfo(l["name"], tuple(l["shape"]), int(l["n_weights"]), l["kind"], int(l["groups"]))
                  for l in d["layers"]]
        return cls(layers, np.asarray(d["grid"], float), np.asarray(d["d_raw"], float),
                   np.asarray(d["d_res"], float), dict(d.get("meta", {})))


def validate_grid(grid: Sequence[float], s_max: float) -> np.ndarray:
    """Sorted unique grid in (0, 1) whose top reaches ``s_max`` (so no allocation extrapolates)."""
    g = np.unique(np.asarray(list(grid), dtype=float))
    if len(g) == 0 or g[0] <= 0 or g[-1] >= 1:
        raise UserError(f"grid sparsities must lie in (0, 1), got {list(grid)}: pass e.g. --grid 0.5 0.9 0.99")
    if not 0 < s_max < 1:
        raise UserError(f"--s-max must lie in (0, 1), got {s_max}")
    if g[-1] < s_max - 1e-12:
        raise UserError(f"the grid tops out at {g[-1]} below --s-max {s_max}: "
                        f"add {s_max} to --grid or lower --s-max")
    return g


def removed_weight_stack(weight: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """``(G, *weight.shape)``: for each grid sparsity, the weights that pruning removes."""
    order = magnitude_order(weight)
    flat = weight.detach().flatten()
    out = torch.zeros((len(grid), flat.numel()), dtype=weight.dtype, device=weight.device)
    for j, s in enumerate(grid):
        idx = order[:n_pruned(s, flat.numel())]
        out[j, idx] = flat[idx]
    return out.view(len(grid), *weight.shape)


def grid_outputs(layer: nn.Module, x: torch.Tensor, w_stack: torch.Tensor) -> torch.Tensor:
    """Bias-free outputs of ``layer`` on input ``x`` for each weight in ``w_stack``, as ``(B, G, C, X)``.

    One call for all grid points: the stacked weights act as one layer with
    ``G`` times the output channels (interleaved per group for grouped convs).
    """
    G = w_stack.shape[0]
    if isinstance(layer, nn.Conv2d):
        g, c_out = layer.groups, w_stack.shape[1]
        w = w_stack.view(G, g, c_out // g, *w_stack.shape[2:]).transpose(0, 1).reshape(G * c_out, *w_stack.shape[2:])
        y = layer._conv_forward(x, w, None)  # honours padding_mode, stride, dilation, groups
        B = y.shape[0]
        y = y.view(B, g, G, c_out // g, -1).transpose(1, 2)
        return y.reshape(B, G, c_out, -1)
    if isinstance(layer, nn.Linear):
        c_out = w_stack.shape[1]
        y = F.linear(x, w_stack.reshape(G * c_out, -1))  # (B, ..., G*C)
        y = y.view(*y.shape[:-1], G, c_out)
        y = y.movedim(-2, 1).movedim(-1, 2)  # (B, G, C, ...)
        return y.reshape(y.shape[0], G, c_out, -1)
    raise TypeError(f"unsupported layer type {type(layer).__name__}")


def _channel_dim(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


@contextlib.contextmanager
def _collect(model: nn.Module, layers: list[LayerInfo], stacks: dict[str, torch.Tensor],
             acc: dict[str, JointMoments]) -> Iterator[None]:
    """Register the profiling hooks for the duration of the block; always removed."""
    handles = []

    def make_hook(name: str):
        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            e = -grid_outputs(mod, inputs[0], stacks[name])
            acc[name].add_batch(as_bcx(out, _channel_dim(mod)), e)
        return hook

    try:
        for l in layers:
            handles.append(model.get_submodule(l.name).register_forward_hook(make_hook(l.name)))
        yield
    finally:
        for h in handles:
            h.remove()


def profile_rr(model: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]],
               grid: Sequence[float] = DEFAULT_GRID, layers: list[LayerInfo] | None = None,
               lam: str | float = "mean", mean_shift: bool = True,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               progress: bool = False) -> RRProfile:
    """Measure ``D_raw``, ``D_res`` (layer-local, after ASR) and ``RR`` in one pass.

    ``model`` is used in eval mode and left unchanged (no hooks, same weights).
    ``dtype=torch.float64`` runs the pass in double precision (used by tests).
    """
    from tqdm.auto import tqdm

    layers = layers or prunable_layers(model)
    grid = [float(s) for s in grid]
    if dtype is not None and next(model.parameters()).dtype != dtype:
        import copy

        model = copy.deepcopy(model).to(dtype)  # the caller's model keeps its dtype
    was_training = model.training
    model.eval()
    stacks = {l.name: removed_weight_stack(model.get_submodule(l.name).weight, grid) for l in layers}
    acc = {l.name: JointMoments() for l in layers}
    n_images = 0
    try:
        with torch.inference_mode(), _collect(model, layers, stacks, acc):
            for x, _ in tqdm(batches, desc="RR profile", leave=False, disable=not progress):
                x = x.to(device=device, dtype=dtype or x.dtype, non_blocking=True)
                model(x)
                n_images += x.shape[0]
    finally:
        model.train(was_training)
    d_raw = np.zeros((len(layers), len(grid)))
    d_res = np.zeros_like(d_raw)
    for i, l in enumerate(layers):
        raw, res = distortions(acc[l.name].moments(), lam=lam, mean_shift=mean_shift)
        d_raw[i], d_res[i] = raw.cpu().numpy(), res.cpu().numpy()
    meta = {"n_images": n_images, "lambda": lam, "mean_shift": mean_shift,
            "profile_repair": "asr (layer output, mean shift)" if mean_shift else "asr (layer output)"}
    return RRProfile(layers, np.asarray(grid), d_raw, d_res, meta)
