"""Relative Repairability profile: one streaming pass over the calibration set.

For every prunable layer ``l`` and grid sparsity ``s`` the layer alone is
magnitude-pruned and fed the *dense* network's input. Instead of rerunning
the network per (layer, s), a forward hook takes each layer's dense input
once and evaluates all grid points in a single call of the layer with
stacked weights ``[W, -R_1, ..., -R_G]``: the dense output and, for each grid
point, the error ``e = y_p - y_d = -f(x; R_s)`` computed from the *removed*
weights ``R_s`` directly (the bias cancels; no cancellation between ``y_p`` and
``y_d``). One batched GEMM then gives every per-channel first and second
moment (the Gram matrix of the stacked outputs).

Cost: one dense forward plus, per layer, one call with ``G + 1`` times its
output channels and a small GEMM: about ``(1 + G)`` dense forwards.

``profile_repair="lsq"`` measures repairability under the least-squares
re-fit instead of the channel-wise repair: the same pass also accumulates
each layer's input Gram matrix ``H`` (only then), and ``D_res`` is the
closed-form residual of the re-fit per grid sparsity (``lsq_residuals``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..nn.hooks import forward_hooks
from ..nn.layers import LayerInfo, conv2d_as, prunable_layers
from ..nn.pruning import magnitude_order, n_pruned
from ..nn.stats import as_bcx, distortions
from ..repair.reconstruct import bias_targets
from ..repair.refit import (
    GramStats,
    damp_text,
    damping,
    input_patches,
    keep_rows,
    lsq_residuals,
    obs_select,
    seen_input,
    unsupported_reason,
    weight_rows,
)

__all__ = [
    "DEFAULT_GRID",
    "RRProfile",
    "profile_rr",
    "removed_weight_stack",
    "probe_weights",
    "GramMoments",
    "validate_grid",
]

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
                rows.append(
                    {
                        "layer": l.name,
                        "n_weights": l.n_weights,
                        "sparsity": float(s),
                        "d_raw": float(self.d_raw[i, j]),
                        "d_res": float(self.d_res[i, j]),
                        "rr": float(rr[i, j]),
                    }
                )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [
                {"name": l.name, "shape": list(l.shape), "n_weights": l.n_weights, "kind": l.kind, "groups": l.groups}
                for l in self.layers
            ],
            "grid": self.grid.tolist(),
            "d_raw": self.d_raw.tolist(),
            "d_res": self.d_res.tolist(),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RRProfile":
        layers = [
            LayerInfo(l["name"], tuple(l["shape"]), int(l["n_weights"]), l["kind"], int(l["groups"]))
            for l in d["layers"]
        ]
        return cls(
            layers,
            np.asarray(d["grid"], float),
            np.asarray(d["d_raw"], float),
            np.asarray(d["d_res"], float),
            dict(d.get("meta", {})),
        )


def validate_grid(grid: Sequence[float], s_max: float) -> np.ndarray:
    """Sorted unique grid in (0, 1) whose top reaches ``s_max`` (so no allocation extrapolates)."""
    g = np.unique(np.asarray(list(grid), dtype=float))
    if len(g) == 0 or g[0] <= 0 or g[-1] >= 1:
        raise UserError(f"grid sparsities must lie in (0, 1), got {list(grid)}: pass e.g. --grid 0.5 0.9 0.99")
    if not 0 < s_max < 1:
        raise UserError(f"--s-max must lie in (0, 1), got {s_max}")
    if g[-1] < s_max - 1e-12:
        raise UserError(f"the grid tops out at {g[-1]} below --s-max {s_max}: add {s_max} to --grid or lower --s-max")
    return g


def removed_weight_stack(weight: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """``(G, *weight.shape)``: for each grid sparsity, the weights that pruning removes."""
    order = magnitude_order(weight)
    flat = weight.detach().flatten()
    out = torch.zeros((len(grid), flat.numel()), dtype=weight.dtype, device=weight.device)
    for j, s in enumerate(grid):
        idx = order[: n_pruned(s, flat.numel())]
        out[j, idx] = flat[idx]
    return out.view(len(grid), *weight.shape)


def probe_weights(layer: nn.Module, grid: Sequence[float]) -> torch.Tensor:
    """Stacked weights ``[W, -R_1, ..., -R_G]`` in channel-major order, as one layer's weight.

    Row 0 of each output channel gives the dense output, row ``g`` the error
    ``e_g = y_p - y_d = -f(x; R_g)`` (``R_g`` = weights removed at grid point g).
    Channel-major (``c * (G+1) + g``) makes the output view as ``(B, C, G+1, X)``
    without a copy; grouped convs keep each group's outputs contiguous.
    """
    w = layer.weight.detach()
    stack = torch.cat([w.unsqueeze(0), -removed_weight_stack(w, grid)])  # (G+1, C, ...)
    return stack.transpose(0, 1).reshape(-1, *w.shape[1:])


class GramMoments:
    """Per-channel sums and Gram matrices of ``z = [y_d - shift, e_1, ..., e_G]`` (float64 accumulators).

    The Gram matrix ``sum z z^T`` over positions holds every second moment the
    closed form needs (``v_d``, ``v_e``, ``cov(e, y_d)``) and is one batched GEMM
    per layer and batch. The dense row is shifted by the first batch's mean so
    ``E[y_d^2] - E[y_d]^2`` does not cancel.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def add_batch(self, z: torch.Tensor) -> None:
        """``z``: ``(B, C, G+1, X)``, row 0 already shifted."""
        B, C, K, X = z.shape
        zz = z.reshape(B * C, K, X)
        s1 = zz.sum(-1).view(B, C, K).sum(0, dtype=torch.float64)
        gram = torch.bmm(zz, zz.transpose(1, 2)).view(B, C, K, K).sum(0, dtype=torch.float64)
        if self.s1 is None:
            self.s1, self.gram = s1, gram
        else:
            self.s1 += s1
            self.gram += gram
        self.n += B * X

    def moments(self) -> dict[str, torch.Tensor]:
        """``mu_d, v_d`` (C,) and ``mu_e, v_e, c_de`` (G, C), float64 population moments."""
        m = self.s1 / self.n  # (C, K)
        cov = self.gram / self.n - m[:, :, None] * m[:, None, :]  # (C, K, K)
        diag = torch.diagonal(cov, dim1=1, dim2=2)
        return {
            "mu_d": m[:, 0] + self.shift.double(),
            "v_d": diag[:, 0].clamp_min(0.0),
            "mu_e": m[:, 1:].T.contiguous(),
            "v_e": diag[:, 1:].T.clamp_min(0.0).contiguous(),
            "c_de": cov[:, 1:, 0].T.contiguous(),
        }


def _probe(layer: nn.Module, x: torch.Tensor, stack: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Run the stacked probe weights on ``x``; returns ``(B, C, G+1, X)``.

    ``bias`` has one entry per probe row: ``b - shift`` on the dense row, 0 on the error rows.
    """
    if isinstance(layer, nn.Conv2d):
        C = layer.out_channels
        fused = _fuses_bias(x)
        if type(layer).forward is nn.Conv2d.forward:
            y = conv2d_as(layer, x, stack, bias if fused else None)
        else:  # a forward of its own (TF-style same padding): convolve what the layer's conv2d really sees
            seen, pads = seen_input(layer, x)
            y = F.conv2d(
                F.pad(seen, pads), stack, bias if fused else None, layer.stride, 0, layer.dilation, layer.groups
            )
        z = y.view(y.shape[0], C, -1, y.shape[2] * y.shape[3])
        if not fused:  # only the dense row has a bias: add it there, not to all G+1 rows
            z[:, :, 0].add_(bias.view(C, -1)[:, :1])
        return z
    if isinstance(layer, nn.Linear):
        y = F.linear(x, stack, bias)  # (B, ..., C*(G+1)); the bias is fused into the GEMM on every device
        C = layer.out_features
        y = y.reshape(-1, C, stack.shape[0] // C)  # positions x C x (G+1)
        return y.permute(1, 2, 0).unsqueeze(0)  # (1, C, G+1, positions)
    raise TypeError(f"unsupported layer type {type(layer).__name__}")


def _fuses_bias(x: torch.Tensor) -> bool:
    """Whether a convolution adds its bias for free (oneDNN on CPU fuses it).

    cuDNN adds a conv bias in a separate unvectorised pass over the whole ``(G+1)``-times output:
    15% of the profile's GPU time on CIFAR ResNets (``studies/bench_profile.py --breakdown``).
    """
    return not x.is_cuda


def _probe_hooks(
    layers: list[LayerInfo],
    stacks: dict[str, torch.Tensor],
    acc: dict[str, GramMoments],
    grams: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The profiling forward hook of each layer (registered by ``forward_hooks``)."""
    biases: dict[str, torch.Tensor] = {}  # per probe row: dense row b - shift, error rows 0 (the bias cancels)

    def make_hook(name: str):
        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            a = acc[name]
            if a.shift is None:  # first batch: shift the dense row by its per-channel mean
                cdim = -1 if isinstance(mod, nn.Linear) else 1
                a.shift = as_bcx(out, cdim).mean(dim=(0, 2))
                st = stacks[name]
                K = st.shape[0] // a.shift.numel()
                b = torch.zeros(a.shift.numel(), K, dtype=st.dtype, device=st.device)
                b[:, 0] = (mod.bias.detach() if mod.bias is not None else 0) - a.shift
                biases[name] = b.reshape(-1)
            a.add_batch(_probe(mod, inputs[0], stacks[name], biases[name]))
            if grams is not None and name in grams:
                grams[name].add(input_patches(mod, inputs[0]), images=inputs[0].shape[0])

        return hook

    return {l.name: make_hook(l.name) for l in layers}


PROFILE_REPAIRS = ("channel", "lsq", "obs")


def profile_rr(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, Any]],
    grid: Sequence[float] = DEFAULT_GRID,
    layers: list[LayerInfo] | None = None,
    lam: str | float = "mean",
    mean_shift: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
    profile_repair: str = "channel",
    damp: float | None = None,
) -> RRProfile:
    """Measure ``D_raw``, ``D_res`` (layer-local, after the profile repair) and ``RR`` in one pass.

    ``profile_repair``: ``channel`` (ASR at the layer output) or ``lsq`` (least-squares re-fit of the
    kept weights with damping ``damp`` (``None``: ``damp=auto``); layers the re-fit skips, e.g. grouped convs, keep the
    channel-wise ``D_res``). ``model`` is used in eval mode and left unchanged (no hooks, same
    weights). ``dtype=torch.float64`` runs the pass in double precision (used by tests).
    """
    if profile_repair not in PROFILE_REPAIRS:
        raise UserError(f"unknown profile repair {profile_repair!r}: use {' or '.join(PROFILE_REPAIRS)}")
    from ..system.progress import bar

    layers = layers or prunable_layers(model)
    grid = [float(s) for s in grid]
    if dtype is not None and next(model.parameters()).dtype != dtype:
        import copy

        model = copy.deepcopy(model).to(dtype)  # the caller's model keeps its dtype
    stacks = {l.name: probe_weights(model.get_submodule(l.name), grid) for l in layers}
    acc = {l.name: GramMoments() for l in layers}
    grams = None
    if profile_repair in ("lsq", "obs"):
        targets = bias_targets(model)
        grams = {
            l.name: GramStats(targets.get(l.name) is not None)
            for l in layers
            if unsupported_reason(model.get_submodule(l.name), exact=True) is None
        }
    n_images = 0
    with torch.inference_mode(), forward_hooks(model, _probe_hooks(layers, stacks, acc, grams)):
        for x, _ in bar(batches, desc="RR profile", disable=not progress):
            x = x.to(device=device, dtype=dtype or x.dtype, non_blocking=True)
            model(x)
            n_images += x.shape[0]
    d_raw, d_res = _distortions(model, layers, grid, acc, grams, lam, mean_shift, damp, profile_repair == "obs")
    meta = {
        "n_images": n_images,
        "lambda": lam,
        "mean_shift": mean_shift,
        "profile_repair": "asr (layer output, mean shift)" if mean_shift else "asr (layer output)",
    }
    if grams is not None:
        meta["profile_repair"] = (
            f"{profile_repair} (damp={damp_text(damp)}; others channel-wise)"
            if len(grams) < len(layers)
            else f"{profile_repair} (damp={damp_text(damp)})"
        )
    return RRProfile(layers, np.asarray(grid), d_raw, d_res, meta)


def _distortions(
    model: nn.Module,
    layers: list[LayerInfo],
    grid: list[float],
    acc: dict[str, GramMoments],
    grams: dict[str, GramStats] | None,
    lam: str | float,
    mean_shift: bool,
    damp: float | None,
    obs: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``D_raw`` and ``D_res`` (layers x grid) from the accumulated moments (and Gram statistics for lsq)."""
    d_raw = np.zeros((len(layers), len(grid)))
    d_res = np.zeros_like(d_raw)
    for i, l in enumerate(layers):
        mom = acc[l.name].moments()
        raw, res = distortions(mom, lam=lam, mean_shift=mean_shift)
        d_raw[i], d_res[i] = raw.cpu().numpy(), res.cpu().numpy()
        if grams is not None and l.name in grams:
            layer = model.get_submodule(l.name)
            d_res[i] = _lsq_d_res(layer, grams[l.name], grid, damp, float(mom["v_d"].sum()), obs)
    return d_raw, d_res


def _lsq_d_res(
    layer: nn.Module, gram: GramStats, grid: Sequence[float], damp: float | None, v_d_sum: float, obs: bool = False
) -> np.ndarray:
    """``D_res`` under the least-squares re-fit at each grid sparsity (dense inputs): of the magnitude masks,
    or (``obs``) of the masks OBS chooses with the same count, as the ``obs`` step does with dense inputs."""
    H = gram.H
    w = weight_rows(layer, gram.with_const)
    d = layer.weight[0].numel()
    lam = damping(H, damp, d, gram.images)
    order = magnitude_order(layer.weight)
    out = np.zeros(len(grid))
    for j, s in enumerate(grid):
        k = n_pruned(s, layer.weight.numel())
        if obs:  # with dense inputs the all-kept optimum is the dense weights themselves
            keep = obs_select(w.double(), H, lam, k, d)[:, :d]
        else:
            keep = torch.ones(layer.weight.numel(), dtype=torch.bool, device=w.device)
            keep[order[:k]] = False
        keep = keep_rows(keep.reshape(w.shape[0], d), gram.with_const)
        e = lsq_residuals(H, w, keep, lam).sum().clamp_min(0.0)
        out[j] = float(e) / gram.n / max(v_d_sum, 1e-300)
    return out
