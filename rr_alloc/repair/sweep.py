"""SparseGPT's sweep and the solves without one factorisation per row (the re-fit of large layers).

``sweep`` visits the columns in lazy blocks with the upper Cholesky factor of ``(H + lam I)^-1``, pruning
by OBS saliency (or removing a fixed mask) and spreading each error over the columns not yet visited;
``solve_all_kept`` is the all-kept optimum from one shared factorisation; ``refine_kept`` takes every row's
kept block to the exact solution by batched conjugate gradients.
"""

from __future__ import annotations

import torch

from ..errors import UserError

__all__ = ["DEFAULT_OBS_BLOCK", "cholesky_with_jitter", "solve_all_kept", "refine_kept", "obs_select", "sweep"]

DEFAULT_OBS_BLOCK = 128
JITTERS = (1e-8, 1e-6, 1e-4, 1e-2)  # extra damping tried in turn, as fractions of the mean diagonal


def cholesky_with_jitter(A: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """Cholesky factor of ``A`` (one matrix or a batch; lower unless ``upper``). A matrix that is not positive
    definite in floating point (dead inputs, fewer samples than inputs under ``damp=0``) gets ``1e-8`` of its mean
    diagonal added, then ``1e-6``, ``1e-4`` and ``1e-2``, until it factorises: the least damping that makes the
    solve exist."""
    L, info = torch.linalg.cholesky_ex(A, upper=upper)
    bad = info != 0
    if not bad.any():
        return L
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    scale = torch.diagonal(A, dim1=-2, dim2=-1).mean(-1).abs().clamp_min(1e-12)
    for jitter in JITTERS:
        fixed, info_fixed = torch.linalg.cholesky_ex(A + (jitter * scale)[..., None, None] * eye, upper=upper)
        L = torch.where(bad[..., None, None], fixed, L)
        bad = bad & (info_fixed != 0)
        if not bad.any():
            return L
    raise UserError(
        "a layer's Gram matrix cannot be factorised even with 1e-2 of its mean diagonal added (non-finite "
        "activations?): check the model and the calibration images, or raise damp (e.g. obs:damp=0.01)"
    )


def solve_all_kept(H: torch.Tensor, rhs: torch.Tensor, lam: float) -> torch.Tensor:
    """Every row's least-squares optimum with all columns kept: one shared factorisation,
    ``O(d^3 + rows d^2)`` (the rows differ only in their right-hand sides)."""
    d = H.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=H.device)
    L = cholesky_with_jitter(H.double() + lam * eye)
    return torch.cholesky_solve(rhs.double().T, L).T


def refine_kept(
    H: torch.Tensor, rhs: torch.Tensor, keep: torch.Tensor, lam: float, x0: torch.Tensor, iters: int, tol: float = 1e-10
) -> torch.Tensor:
    """Per row ``i``, ``(H_KK + lam I) x_K = rhs_i,K`` (``K = keep[i]``) by Jacobi-preconditioned conjugate
    gradients from ``x0``, all rows at once: ``solve_kept``'s answer to ``tol`` (relative residual) or after
    ``iters`` steps, at ``iters * rows * d^2`` flops instead of ``rows * d^3 / 3``."""
    m = keep.to(torch.float64)
    Hl = H.double() + lam * torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    b = m * rhs.double()
    x = m * x0.double()
    r = b - m * (x @ Hl)  # Hl is symmetric: row i of x @ Hl is Hl x_i
    diag = torch.diagonal(Hl)
    dinv = m / diag.clamp_min(1e-300)[None, :]
    scale = float(diag.mean().abs()) or 1.0
    z = dinv * r
    p = z.clone()
    rz = (r * z).sum(1)
    bnorm = b.norm(dim=1).clamp_min(1e-300)
    for _ in range(iters):
        if bool((r.norm(dim=1) <= tol * bnorm).all()):
            break
        ap = m * (p @ Hl)
        curv = (p * ap).sum(1)
        # a direction without curvature (a singular H_KK under damp=0) would send x to infinity: that row
        # stops there and restarts from its preconditioned residual
        flat = curv <= 1e-14 * scale * (p * p).sum(1)
        alpha = torch.where(flat, 0.0, rz / curv.clamp_min(1e-300))
        p[flat] = 0.0
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        z = dinv * r
        rz_new = (r * z).sum(1)
        p = z + (rz_new / rz.clamp_min(1e-300))[:, None] * p
        rz = rz_new
    return x * m


def _inverse_factor(H: torch.Tensor, full: torch.Tensor, lam: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lam I)^-1`` in ``full`` column order: row i is column i's OBS update."""
    eye = torch.eye(len(full), dtype=torch.float64, device=full.device)
    L = cholesky_with_jitter(H[full][:, full].double() + lam * eye)
    return cholesky_with_jitter(torch.cholesky_inverse(L), upper=True)


def _lowest_saliency(W1: torch.Tensor, diag: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` weights of a block with the lowest OBS saliency ``w^2 / [H^-1]_jj^2``."""
    sal = (W1**2 / diag[None, :] ** 2).flatten()
    mask1 = torch.zeros(W1.numel(), dtype=torch.bool, device=W1.device)
    if k > 0:
        mask1[torch.sort(sal, stable=True).indices[:k]] = True
    return mask1.view_as(W1)


def _sweep_block(
    W1: torch.Tensor, Hinv1: torch.Tensor, mask1: torch.Tensor, nm: tuple[int, int] | None
) -> torch.Tensor:
    """Prune a block column by column (N:M groups chosen on the way), updating ``W1``; returns the errors."""
    Err1 = torch.zeros_like(W1)
    diag = torch.diagonal(Hinv1)
    for i in range(W1.shape[1]):
        if nm is not None and i % nm[1] == 0:
            g = W1[:, i : i + nm[1]] ** 2 / diag[i : i + nm[1]][None, :] ** 2
            idx = torch.sort(g, dim=1, stable=True).indices[:, : nm[1] - nm[0]]
            mask1[:, i : i + nm[1]].scatter_(1, idx, True)
        w = W1[:, i]
        q = torch.where(mask1[:, i], torch.zeros_like(w), w)
        err = (w - q) / Hinv1[i, i]
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        Err1[:, i] = err
    return Err1


def obs_select(
    W: torch.Tensor,
    H: torch.Tensor,
    lam: float,
    n_prune: int,
    n_cols: int,
    nm: tuple[int, int] | None = None,
    block: int = DEFAULT_OBS_BLOCK,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """The OBS keep-mask of ``sweep`` (the exact re-fit then solves the kept weights again)."""
    return sweep(W, H, lam, n_cols, n_prune=n_prune, nm=nm, block=block, perm=perm)[0]


def sweep(
    W: torch.Tensor,
    H: torch.Tensor,
    lam: float,
    n_cols: int,
    n_prune: int | None = None,
    prune: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
    block: int = DEFAULT_OBS_BLOCK,
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's sweep: the keep-mask over the first ``n_cols`` columns of ``W`` (rows x cols).

    ``W`` (float64) is the layer's least-squares optimum with every weight kept; the loss of a
    mask is ``(w - W) (H + lam I) (w - W)^T`` per row. Columns are visited in ``perm`` order in
    blocks; within a block, the weights of lowest saliency ``w^2 / [H^-1]_jj`` (current,
    updated ``w``) are pruned and their error is spread over the columns not yet visited.
    Unstructured: block ``b`` prunes its share of ``n_prune`` (cumulative rounding), so the layer
    count is exact. N:M (``nm = (n, m)``): per row, ``m - n`` of every ``m`` consecutive columns
    in ``perm`` order are pruned. ``prune`` (rows x n_cols, in column order) fixes the mask instead:
    those weights are removed in turn, with the same updates. Columns past ``n_cols`` (the bias) are
    never pruned. Returns the keep-mask and the updated weights (pruned ones zero), in column order:
    SparseGPT's reconstruction, ``O(d^3 + rows d^2)``.
    """
    rows, d = W.shape
    perm = torch.arange(n_cols, device=W.device) if perm is None else perm
    full = torch.cat([perm, torch.arange(n_cols, d, device=W.device)])
    Wp = W[:, full].clone()
    Hinv = _inverse_factor(H, full, lam)
    fixed = prune[:, perm] if prune is not None else None
    prune = torch.zeros(rows, n_cols, dtype=torch.bool, device=W.device)
    n_prune = int(fixed.sum()) if fixed is not None else n_prune
    total = rows * n_cols
    if nm is not None:  # groups must not straddle blocks
        block = max(nm[1], block - block % nm[1])
    done = 0
    for i1 in range(0, n_cols, block):
        i2 = min(i1 + block, n_cols)
        W1 = Wp[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        if fixed is not None:
            mask1 = fixed[:, i1:i2].clone()
        elif nm is None:
            # this block's share of the layer's count, by cumulative rounding: exact in total
            k = min(round(n_prune * (i2 * rows) / total) - done, W1.numel())
            if i2 == n_cols:
                k = n_prune - done
            done += k
            mask1 = _lowest_saliency(W1, torch.diagonal(Hinv1), k)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        Err1 = _sweep_block(W1, Hinv1, mask1, nm if fixed is None else None)
        prune[:, i1:i2] = mask1
        Wp[:, i1:i2] = W1.masked_fill(mask1, 0.0)  # the block's final weights, pruned ones exactly 0
        Wp[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    keep = torch.ones(rows, n_cols, dtype=torch.bool, device=W.device)
    keep[:, perm] = ~prune
    out = torch.empty_like(Wp)
    out[:, full] = Wp
    return keep, out
