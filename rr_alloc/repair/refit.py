"""The arithmetic of the least-squares re-fit: Gram matrices, damping, kept-weight solves, OBS masks.

A layer's input patches are the rows of ``X``; with a bias, a constant column
is appended (``[X 1]``), in closed form from the column sums rather than by
copying every batch. Per output row, the kept weights ``K`` solve

    (H_KK + lambda I) w_K = rhs_K,   lambda = damp * mean(diag H) over the weight columns,

in float64. ``reconstruct.py`` feeds these the pruned network's inputs and the
dense layer's outputs; the RR profile (``profile.py``) uses the same Gram
matrix of the dense inputs for the closed-form residual (``lsq_residuals``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .sweep import DEFAULT_OBS_BLOCK, obs_select, refine_kept, solve_all_kept, sweep  # noqa: F401 - re-exported

__all__ = [
    "DEFAULT_DAMP",
    "DEFAULT_OBS_BLOCK",
    "MAX_SOLVE_FLOPS",
    "unsupported_reason",
    "input_patches",
    "patch_view",
    "seen_input",
    "check_patches",
    "output_rows",
    "GramStats",
    "weight_rows",
    "keep_rows",
    "damping",
    "effective_damp",
    "damp_text",
    "solve_kept",
    "obs_select",
    "sweep",
    "solve_all_kept",
    "refine_kept",
    "exact_solve_flops",
    "nm_column_order",
    "lsq_residuals",
]

DEFAULT_DAMP = 0.01  # damp=auto's fraction of the mean Gram diagonal from AUTO_DAMP_IMAGES images on
AUTO_DAMP_IMAGES = 1024  # the CIFAR screen's calibration set, where 0.01 won
# The exact re-fit factorises one system per output row on its kept columns: at most rows * d^3 / 3 flops
# (rows * ((1 - s) d)^3 / 3 at sparsity s). Layers whose bound exceeds this
# (ImageNet-sized convs: 512 rows x 4608 inputs is 1.6e13) get SparseGPT's sweep instead (one shared
# factorisation, d^3 + rows d^2), which a few seconds bound; every CIFAR ResNet layer is below it
# (64 x 577^3 / 3 = 4e9), where studies/sweep_vs_exact.py compares the two.
MAX_SOLVE_FLOPS = 5e10
# rows solved per batched factorisation: bounds each (rows, d, d) float64 stack (the system and its
# Cholesky factor) to about 64 MB, so the solves add little to the activations' peak memory
SOLVE_BYTES = 64 * 2**20


def exact_solve_flops(layer: nn.Module) -> float:
    """Flops of the exact per-row re-fit of ``layer``: one ``(d+1)^2`` factorisation per output row."""
    rows, d = layer.weight.shape[0], layer.weight[0].numel() + 1
    return rows * d**3 / 3


def unsupported_reason(layer: nn.Module, exact: bool = False) -> str | None:
    """Why ``layer`` cannot be reconstructed, or ``None``; ``exact``: by the exact per-row re-fit (the RR
    profile's closed form), which is refused above ``MAX_SOLVE_FLOPS`` (the sweep has no such limit)."""
    w = getattr(layer, "weight", None)
    if exact and w is not None and w.dim() >= 2:
        rows, d = w.shape[0], w[0].numel() + 1
        if rows * d**3 / 3 > MAX_SOLVE_FLOPS:
            return (
                f"the exact per-row re-fit would cost {rows * d**3 / 3:.1e} flops ({rows} rows x {d} inputs), "
                f"above {MAX_SOLVE_FLOPS:.0e}"
            )
    if isinstance(layer, nn.Linear):
        return None
    if isinstance(layer, nn.Conv2d):
        if exact and layer.groups != 1:  # the reconstruction fits each group; the profile's closed form does not
            return f"grouped convolution (groups={layer.groups}): the profile's closed form is for dense convs"
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r}: patches are extracted with zero padding"
        return None
    return f"{type(layer).__name__} is not a Conv2d or Linear"


def input_patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of input patches ``(positions, d)`` whose product with ``weight.flatten(1).T`` is the output.

    A grouped conv's columns hold its groups one after another: group ``i``'s patches are the columns
    ``i * d_g`` to ``(i + 1) * d_g`` (``d_g = C_in / groups * k^2``), its outputs the rows of group ``i``.

    Conv patches come from strided views and one copy (``F.unfold`` plus the transpose costs
    about 3.5x more on CPU); column order (channel, kh, kw) matches ``weight.flatten(1)``.
    """
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    v = patch_view(layer, x)  # (B, C, Ho, Wo, kh, kw)
    return v.permute(0, 2, 3, 1, 4, 5).reshape(-1, v.shape[1] * v.shape[4] * v.shape[5])


def patch_view(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The strided view ``(B, C, Ho, Wo, kh, kw)`` of the patches the convolution multiplies (no copy)."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    x, pads = seen_input(layer, x)
    xp = F.pad(x, pads) if any(pads) else x
    v = xp.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)  # (B, C, Ho, Wo, span_h, span_w)
    return v[..., ::dh, ::dw] if dh > 1 or dw > 1 else v


def seen_input(layer: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The input the convolution really sees and its zero padding ``(left, right, top, bottom)``.

    A plain ``nn.Conv2d`` pads by its ``padding`` (``"same"`` as PyTorch places it: the odd pixel right and
    below). A conv with a forward of its own (TF-style "same" padding, as timm's ``Conv2dSame``, or padding
    done in a wrapper) is run once on ``x`` and what reaches ``F.conv2d`` is recorded.
    """
    if type(layer).forward is nn.Conv2d.forward:
        return x, _pads(layer, layer.padding)
    from torch.overrides import TorchFunctionMode

    seen: dict[str, Any] = {}

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            if func in (F.conv2d, torch.conv2d) and "x" not in seen:
                seen["x"] = args[0]
                seen["padding"] = args[4] if len(args) > 4 else kwargs.get("padding", 0)
            return func(*args, **kwargs)

    with torch.no_grad(), Record():
        layer.forward(x)  # not layer(x): the caller may be one of the layer's own hooks
    if "x" not in seen:
        raise UserError(f"{type(layer).__name__} never calls conv2d in its forward: its patches are unknown")
    return seen["x"], _pads(layer, seen["padding"])


def _pads(layer: nn.Conv2d, padding: Any) -> tuple[int, int, int, int]:
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        (kh, kw), (dh, dw) = layer.kernel_size, layer.dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return (pw, pw, ph, ph)


def check_patches(name: str, layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The patches of ``x`` times the layer's weights must give its output ``y``: else a one-line error naming
    the layer (its forward does something to the input that the patches do not see)."""
    g = getattr(layer, "groups", 1)
    w = layer.weight.detach().flatten(1).to(x.dtype)  # (C_out, C_in / groups * k^2)
    p = input_patches(layer, x)
    rows = torch.einsum("pgi,goi->pgo", p.view(len(p), g, -1), w.view(g, -1, w.shape[1])).reshape(len(p), -1)
    if layer.bias is not None:
        rows = rows + layer.bias.detach().to(x.dtype)
    want = output_rows(layer, y)
    if rows.shape != want.shape or (rows - want).abs().max() > 1e-3 * (1.0 + want.abs().max()):
        raise UserError(
            f"layer {name}: its input patches do not reproduce its output ({type(layer).__name__} transforms its "
            "input in a way the reconstruction does not see): exclude it with --exclude "
            f"{name} or repair without lsq/obs"
        )


def output_rows(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer output as rows ``(positions, C_out)`` in the order of ``input_patches``."""
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


class GramStats:
    """Streaming statistics of one layer's least-squares problem (float64 accumulators).

    ``H = X^T X`` of the input patch rows ``X`` (pruned network) and ``R = X^T Y`` with the target
    outputs ``Y`` (the dense layer on the dense input), plus column sums and the count, so the
    constant (bias) column is appended in closed form rather than by copying every batch.
    Using ``X^T Y`` instead of the cross Gram ``X_p^T X_d`` costs ``d * C_out`` instead of ``d^2``
    per row.
    """

    def __init__(self, with_const: bool) -> None:
        self.with_const = with_const
        self.n = 0
        self.images = 0  # calibration images the rows came from (what damp=auto scales with)
        self._h: torch.Tensor | None = None
        self._r: torch.Tensor | None = None
        self._sx: torch.Tensor | None = None
        self._sy: torch.Tensor | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None, images: int = 0) -> None:
        """Add patch rows ``x`` (positions, d) of ``images`` images and targets ``y`` (positions, C_out);
        ``y=None``: ``H`` only."""
        h = (x.T @ x).double()  # one GEMM per batch in the activations' dtype, summed in float64
        sx = x.sum(0).double()  # float32 sums are pairwise (accurate); casting every row costs 3x
        r = (x.T @ y).double() if y is not None else None
        sy = y.sum(0).double() if y is not None else None
        if self._h is None:
            self._h, self._sx, self._r, self._sy = h, sx, r, sy
        else:
            self._h += h
            self._sx += sx
            if r is not None:
                self._r += r
                self._sy += sy
        self.n += x.shape[0]
        self.images += images

    @classmethod
    def of_sums(
        cls,
        n: int,
        h: torch.Tensor,
        sx: torch.Tensor,
        r: torch.Tensor | None,
        sy: torch.Tensor | None,
        const: bool,
        images: int,
    ) -> GramStats:
        """The statistics of ``n`` rows of ``images`` images from their sums: ``X^T X``, ``X^T 1``, ``X^T Y`` and
        ``Y^T 1``."""
        out = cls(const)
        out.n, out._h, out._sx, out._r, out._sy, out.images = n, h, sx, r, sy, images
        return out

    @property
    def H(self) -> torch.Tensor:
        """``[X 1]^T [X 1]`` (or ``X^T X`` without the constant column)."""
        if not self.with_const:
            return self._h
        d = self._h.shape[0]
        out = self._h.new_empty(d + 1, d + 1)
        out[:d, :d] = self._h
        out[:d, d] = out[d, :d] = self._sx
        out[d, d] = float(self.n)
        return out

    @property
    def R(self) -> torch.Tensor:
        """``[X 1]^T Y`` (or ``X^T Y``)."""
        return torch.cat([self._r, self._sy[None]], 0) if self.with_const else self._r


def weight_rows(layer: nn.Module, with_const: bool) -> torch.Tensor:
    """``layer``'s weights as float64 rows ``(C_out, d)``, with its bias (0 when none) as a last column."""
    w = layer.weight.detach().flatten(1).double()
    if not with_const:
        return w
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(w.shape[0])
    return torch.cat([w, b[:, None]], 1)


def keep_rows(keep: torch.Tensor, with_const: bool) -> torch.Tensor:
    """Per-row kept columns ``(C_out, d)``, with the constant column (always kept) appended."""
    return torch.cat([keep, keep.new_ones(keep.shape[0], 1)], 1) if with_const else keep


def effective_damp(damp: float | None, images: int) -> float:
    """The damping fraction a re-fit uses: ``damp`` as given, or with ``damp=auto`` (``None``) ``DEFAULT_DAMP``
    on ``AUTO_DAMP_IMAGES`` calibration images or more, raised as ``1 / images`` below them.

    The mean Gram diagonal grows with the images while the weights' prior does not, so a fixed prior strength
    is a fraction that falls as ``1 / images``. Measured: at 0.9 on the CIFAR ResNets ``damp=0.01`` won the
    screen on 1024 images and ``damp=0.1`` beat it on 128; on EfficientNet-Lite with 128 photos 0.1 beat
    0.01 as well (``studies/damping_check.py``, ``studies/edge_allocation.py``)."""
    if damp is not None:
        return damp
    if images < 1:
        raise ValueError("damp=auto needs the number of calibration images the Gram matrix was summed over")
    return DEFAULT_DAMP * max(1.0, AUTO_DAMP_IMAGES / images)


def damping(H: torch.Tensor, damp: float | None, n_weight_cols: int, images: int) -> float:
    """The damping fraction (``effective_damp``) times the mean diagonal of the weight columns (the constant
    column is left out)."""
    return float(effective_damp(damp, images) * torch.diagonal(H)[:n_weight_cols].mean())


def damp_text(damp: float | None) -> str:
    """``damp`` as the repair grammar writes it: ``auto`` or the number."""
    return "auto" if damp is None else f"{damp:g}"


def solve_kept(H: torch.Tensor, rhs: torch.Tensor, keep: torch.Tensor, lam: float) -> torch.Tensor:
    """Per row ``i``: ``x_K = (H_KK + lam I)^-1 rhs_i,K`` with ``K = keep[i]``, zeros elsewhere.

    Batched over rows on their kept columns only: each row's ``H_KK + lam I`` is gathered into a
    ``k x k`` block (``k`` the largest kept count of the chunk, shorter rows padded with the identity),
    so a row at sparsity ``s`` costs ``((1 - s) d)^3 / 3``, not ``d^3 / 3``. Cholesky first; rows whose
    block is singular are solved by least squares (minimum-norm), so dead inputs never crash the solve.
    """
    rows, d = rhs.shape
    out = torch.zeros_like(rhs, dtype=torch.float64)
    Hl = H.double() + lam * torch.eye(d, dtype=torch.float64, device=H.device)
    counts = keep.sum(1)
    # rows in order of their kept counts, so each chunk pads little
    order = torch.argsort(counts, stable=True)
    kmax_all = int(counts.max()) if rows else 0
    chunk = max(1, int(SOLVE_BYTES // (8 * max(kmax_all, 1) ** 2)))
    for r0 in range(0, rows, chunk):
        sel = order[r0 : r0 + chunk]
        k = int(counts[sel].max())
        if k == 0:
            continue
        # kept columns first (in column order), then padding: a stable sort of ~keep
        idx = torch.argsort((~keep[sel]).to(torch.int8), dim=1, stable=True)[:, :k]
        v = torch.arange(k, device=keep.device)[None, :] < counts[sel][:, None]  # (r, k) real columns
        vf = v.to(torch.float64)
        A = Hl[idx[:, :, None], idx[:, None, :]]
        A.mul_(vf[:, :, None]).mul_(vf[:, None, :])
        A.diagonal(dim1=1, dim2=2).add_(1.0 - vf)
        b = (vf * torch.gather(rhs[sel].double(), 1, idx)).unsqueeze(-1)
        L, info = torch.linalg.cholesky_ex(A)
        x = torch.cholesky_solve(b, L)
        bad = info != 0
        if bad.any():
            x[bad] = torch.linalg.lstsq(A[bad].cpu(), b[bad].cpu(), driver="gelsd").solution.to(x)
        block = torch.zeros(len(sel), d, dtype=torch.float64, device=out.device)
        block.scatter_add_(1, idx, x.squeeze(-1) * vf)  # padded entries add 0
        out[sel] = block
        del A, L
    return out


def nm_column_order(layer: nn.Module, m: int) -> torch.Tensor | None:
    """Column order in which groups of ``m`` input channels at one kernel position are consecutive."""
    w = layer.weight
    c_in = w.shape[1]
    if c_in % m != 0:
        return None
    k = int(w[0, 0].numel())  # kernel positions (1 for Linear)
    return torch.arange(c_in * k, device=w.device).view(c_in, k).T.reshape(-1)


def lsq_residuals(H: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, lam: float) -> torch.Tensor:
    """Per-row residual energy of the ``lsq`` re-fit with dense inputs, in closed form.

    ``H`` is the uncentred Gram matrix of the layer's input rows (constant column last when
    ``w`` has a bias column), ``w`` the rows ``(C_out, d)``, ``keep`` the kept columns per row.
    With pruned set ``P``, kept set ``K`` and ``A = H_KK + lam I``, the re-fit changes the kept
    weights by ``delta = A^-1 H_KP w_P`` and leaves the error energy

        w_P H_PP w_P^T - b^T A^-1 b - lam ||A^-1 b||^2,   b = H_KP w_P,

    (the Schur complement with ``A``, minus the damping's share; ``lam = 0`` gives the plain Schur
    complement). Summed over positions, not averaged.
    """
    wP = w.double() * (~keep).double()
    b = wP @ H.double()  # rows: (H w_P)^T; its kept part is H_KP w_P
    delta = solve_kept(H, b, keep, lam)  # A^-1 b_K per row, zero on P
    return (wP * b).sum(1) - (b * delta).sum(1) - lam * (delta * delta).sum(1)
