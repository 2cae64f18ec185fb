"""The exact re-fit of every group of a depthwise conv at once.

A depthwise conv is one least-squares problem per channel (one output row of ``k^2`` weights); fitted one by
one, a layer of a thousand channels costs a thousand small factorisations and their Python overhead, more
than the arithmetic. Here every group is solved in one batch, with what ``fit_layer`` does per group (equal
to it, tested): the group's damping, the OBS choice of its pruned count (SparseGPT's saliency
``w^2 / U_jj^2``, ``U`` the upper Cholesky factor of ``(H + lam I)^-1``; a group has fewer weights than an
OBS block, so the choice is made once, from the all-kept optimum) and the solve on the kept columns.
"""

from __future__ import annotations

import torch
from torch import nn

from .grams import GroupGrams
from .refit import effective_damp, keep_rows, weight_rows
from .sweep import cholesky_with_jitter

__all__ = ["fit_depthwise"]


def _obs_keep(Hl: torch.Tensor, rhs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per group, the keep-mask with the same pruned count whose weights have the lowest OBS saliency."""
    d = keep.shape[1]
    L = cholesky_with_jitter(Hl)
    w = torch.cholesky_solve(rhs[..., None], L)[..., 0]  # the all-kept optimum
    U = cholesky_with_jitter(torch.cholesky_inverse(L), upper=True)
    sal = w[:, :d] ** 2 / torch.diagonal(U, dim1=1, dim2=2)[:, :d] ** 2
    order = torch.sort(sal, dim=1, stable=True).indices
    n_prune = (~keep).sum(1, keepdim=True)
    prune = torch.zeros_like(keep).scatter_(1, order, torch.arange(d, device=keep.device)[None, :] < n_prune)
    return ~prune


def _solve_kept(Hl: torch.Tensor, rhs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per group ``x_K = (H_KK + lam I)^-1 rhs_K`` on its kept columns ``K`` (zeros elsewhere): the kept
    blocks gathered, shorter ones padded with the identity; singular blocks by least squares."""
    g, D = rhs.shape
    counts = keep.sum(1)
    k = int(counts.max()) if g else 0
    out = torch.zeros(g, D, dtype=torch.float64, device=rhs.device)
    if k == 0:
        return out
    idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
    v = (torch.arange(k, device=keep.device)[None, :] < counts[:, None]).to(torch.float64)
    A = Hl[torch.arange(g, device=Hl.device)[:, None, None], idx[:, :, None], idx[:, None, :]]
    A.mul_(v[:, :, None]).mul_(v[:, None, :])
    A.diagonal(dim1=1, dim2=2).add_(1.0 - v)
    b = (v * torch.gather(rhs, 1, idx)).unsqueeze(-1)
    L, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(b, L)
    bad = info != 0
    if bad.any():
        x[bad] = torch.linalg.lstsq(A[bad].cpu(), b[bad].cpu(), driver="gelsd").solution.to(x)
    return out.scatter_add_(1, idx, x[..., 0] * v)


@torch.no_grad()
def fit_depthwise(
    name: str,
    pruned: nn.Module,
    dense_layer: nn.Module,
    grams: GroupGrams,
    keep: torch.Tensor,
    method: str,
    damp: float | None,
    bias_to: str | None,
) -> torch.Tensor:
    """Re-fit every group of ``pruned.<name>`` (one output row each) from its Gram pair, ``lsq`` on the given
    masks or ``obs`` choosing them; returns the layer's keep-mask after the fit."""
    layer = pruned.get_submodule(name)
    const = grams.with_const
    d = dense_layer.weight[0].numel()
    H = grams.H.double()
    lam = effective_damp(damp, grams.images) * torch.diagonal(H, dim1=1, dim2=2)[:, :d].mean(1)
    rhs = grams.R[..., 0].double() + lam[:, None] * weight_rows(dense_layer, const).to(H)
    Hl = H + lam[:, None, None] * torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    keep2 = keep.flatten(1).to(H.device)
    if method == "obs":
        keep2 = _obs_keep(Hl, rhs, keep2)
    x = _solve_kept(Hl, rhs, keep_rows(keep2, const))
    layer.weight.copy_(x[:, :d].to(layer.weight.dtype).view_as(layer.weight))
    if const:
        b_new = x[:, d].to(layer.weight.dtype)
        if bias_to == "bias":
            layer.bias.copy_(b_new)
        else:  # BN(y + c) in eval mode equals BN(y) with running_mean - c
            bn = pruned.get_submodule(bias_to)
            bn.running_mean.sub_(b_new.to(bn.running_mean.dtype))
    return keep2.view_as(layer.weight).to(keep.device).clone()
