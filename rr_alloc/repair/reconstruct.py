"""Reconstruction repair: least-squares re-fit of the kept weights (the OBC / SparseGPT family).

For each prunable layer in forward order, the kept weights (and the bias,
see below) of every output row are re-fitted so that the layer, fed the
*pruned* network's input ``x_p``, reproduces the *dense* layer's output on
the *dense* input ``x_d``. With input patches as rows of ``X`` and a constant
column appended for the bias, the per-row problem is

    min_w ||X_p[:, K] w_K - X_d w_d||^2 + lambda ||w_K - w_d,K||^2,

``K`` the row's kept columns. Its normal equations use two Gram matrices
accumulated over the calibration set, ``H = X_p^T X_p`` and ``G = X_p^T X_d``
(float64 accumulators):

    (H_KK + lambda I) w_K = (G w_d)_K + lambda w_d,K.

The damping ``lambda = damp * mean(diag H)`` regularises the *update* of the
kept weights (not the weights themselves), so with dense inputs
(``X_p = X_d``) the residual has the closed form the RR profile uses
(``profile.py``, ``lsq_residuals``). Singular kept blocks (dead inputs at high
sparsity, ``damp = 0``) fall back to a least-squares pseudo-inverse: never a crash.

``obs`` first chooses which weights to prune by OBS saliency
``w^2 / [H^-1]_jj`` with SparseGPT's column sweep (lazy block updates of
the remaining weights), keeping exactly the layer's pruned count (or N of
every group of M for N:M, with groups of M input channels at one kernel
position), then re-fits the kept weights exactly as ``lsq`` does.

Bias: a layer with a bias re-fits it (the constant column); a bias-free conv
whose output feeds a BatchNorm alone moves the fitted bias into that
BatchNorm's running mean (exact in eval mode); other bias-free layers are
fitted without the constant column. No module is added: only weights,
biases and running means change.

Propagation: the dense and the pruned model are traced with their prunable
layers as leaves and run node by node, in lockstep, over all calibration
batches; at each layer both inputs are at hand for every batch, so the whole
reconstruction costs about two forward passes plus the solves. Models that
do not trace, or whose live activations exceed ``max_cache_bytes``, fall
back to two partial forwards (dense and pruned) per layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..hooks import forward_hooks
from .sites import _StandardLeaves, _conv_consumers, _trace
from .staged import CacheTooLarge, _SiteLeaves

__all__ = ["ReconstructStep", "reconstruct", "input_patches", "bias_targets", "solve_kept",
           "obs_select", "GramStats", "output_rows", "ReconstructReport", "RECONSTRUCT_METHODS", "DEFAULT_DAMP", "lsq_residuals",
           "damping", "unsupported_reason"]

RECONSTRUCT_METHODS = ("lsq", "obs")
DEFAULT_DAMP = 0.01
DEFAULT_OBS_BLOCK = 128
# The exact re-fit factorises one (d+1)^2 system per output row: rows * d^3 / 3 flops. Layers above this
# (ImageNet-sized convs: 512 rows x 4608 inputs is 1.6e13) are skipped with a reason instead of running for
# hours; every CIFAR ResNet layer is far below it (64 x 577^3 / 3 = 4e9).
MAX_SOLVE_FLOPS = 5e10
# rows solved per batched factorisation: bounds each (rows, d, d) float64 stack (the system and its
# Cholesky factor) to about 64 MB, so the solves add little to the activations' peak memory
_SOLVE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ReconstructStep:
    """``lsq`` or ``obs`` with its damping (fraction of the mean Gram diagonal) and OBS block size."""

    method: str = "lsq"
    damp: float = DEFAULT_DAMP
    block: int = DEFAULT_OBS_BLOCK

    def __str__(self) -> str:
        s = self.method
        if self.damp != DEFAULT_DAMP:
            s += f":damp={self.damp:g}"
        if self.method == "obs" and self.block != DEFAULT_OBS_BLOCK:
            s += f":block={self.block}"
        return s


@dataclass
class ReconstructReport:
    """What a reconstruction did: layers re-fitted, layers skipped (with why), passes used."""

    fitted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bias: dict[str, str] = field(default_factory=dict)  # layer -> "bias" | "next-bn" | "none"
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # final keep-masks (obs changes them)
    passes: float = 0.0
    path: str = ""


# ------------------------------------------------------------------ inputs
def unsupported_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be reconstructed, or ``None``."""
    w = getattr(layer, "weight", None)
    if w is not None and w.dim() >= 2:
        rows, d = w.shape[0], w[0].numel() + 1
        if rows * d ** 3 / 3 > MAX_SOLVE_FLOPS:
            return (f"the exact per-row re-fit would cost {rows * d ** 3 / 3:.1e} flops ({rows} rows x {d} inputs), "
                    f"above {MAX_SOLVE_FLOPS:.0e}")
    if isinstance(layer, nn.Linear):
        return None
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups}): per-group Gram matrices are not implemented"
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r}: patches are extracted with zero padding"
        if isinstance(layer.padding, str):
            return f"padding={layer.padding!r}: pass explicit padding"
        return None
    return f"{type(layer).__name__} is not a Conv2d or Linear"


def input_patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of input patches ``(positions, d)`` whose product with ``weight.flatten(1).T`` is the output.

    Conv patches come from strided views and one copy (``F.unfold`` plus the transpose costs
    about 3.5x more on CPU); column order (channel, kh, kw) matches ``weight.flatten(1)``.
    """
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = layer.kernel_size, layer.stride, layer.dilation, layer.padding
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    v = xp.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)  # (B, C, Ho, Wo, span_h, span_w)
    if dh > 1 or dw > 1:
        v = v[..., ::dh, ::dw]
    return v.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)


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
        self._h: torch.Tensor | None = None
        self._r: torch.Tensor | None = None
        self._sx: torch.Tensor | None = None
        self._sy: torch.Tensor | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add patch rows ``x`` (positions, d) and targets ``y`` (positions, C_out); ``y=None``: ``H`` only."""
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


def bias_targets(model: nn.Module) -> dict[str, str | None]:
    """Layer name -> where a fitted bias can go: ``"bias"``, the consuming BatchNorm's name, or ``None``."""
    graph = _trace(model, _StandardLeaves())
    consumers = _conv_consumers(graph, model)
    out: dict[str, str | None] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out[name] = "bias" if m.bias is not None else consumers.get(name)
    return out


# ------------------------------------------------------------------ solves
def damping(H: torch.Tensor, damp: float, n_weight_cols: int) -> float:
    """``damp`` times the mean diagonal of the weight columns (the constant column is left out)."""
    return float(damp * torch.diagonal(H)[:n_weight_cols].mean())


def solve_kept(H: torch.Tensor, rhs: torch.Tensor, keep: torch.Tensor, lam: float) -> torch.Tensor:
    """Per row ``i``: ``x_K = (H_KK + lam I)^-1 rhs_i,K`` with ``K = keep[i]``, zeros elsewhere.

    Batched over rows by masking: ``A_i = M (H + lam I) M + (I - M)`` is ``H_KK + lam I`` on the kept
    block and the identity on the pruned one. Cholesky first; rows whose block is singular are
    solved by least squares (minimum-norm), so dead inputs never crash the solve.
    """
    rows, d = rhs.shape
    out = torch.zeros_like(rhs, dtype=torch.float64)
    Hl = H.double() + lam * torch.eye(d, dtype=torch.float64, device=H.device)
    chunk = max(1, int(_SOLVE_BYTES // (8 * d * d)))
    for r0 in range(0, rows, chunk):
        m = keep[r0:r0 + chunk].to(torch.float64)                      # (r, d)
        A = Hl.expand(len(m), d, d).clone()                            # in place below: one (r, d, d) buffer
        A.mul_(m[:, :, None]).mul_(m[:, None, :])
        A.diagonal(dim1=1, dim2=2).add_(1.0 - m)
        b = (m * rhs[r0:r0 + chunk].double()).unsqueeze(-1)
        L, info = torch.linalg.cholesky_ex(A)
        x = torch.cholesky_solve(b, L)
        bad = info != 0
        if bad.any():
            x[bad] = torch.linalg.lstsq(A[bad].cpu(), b[bad].cpu(), driver="gelsd").solution.to(x)
        out[r0:r0 + chunk] = x.squeeze(-1) * m
        del A, L
    return out


def obs_select(W: torch.Tensor, H: torch.Tensor, lam: float, n_prune: int, n_cols: int,
               nm: tuple[int, int] | None = None, block: int = DEFAULT_OBS_BLOCK,
               perm: torch.Tensor | None = None) -> torch.Tensor:
    """SparseGPT's sweep: the keep-mask over the first ``n_cols`` columns of ``W`` (rows x cols).

    ``W`` (float64) is the layer's least-squares optimum with every weight kept; the loss of a
    mask is ``(w - W) (H + lam I) (w - W)^T`` per row. Columns are visited in ``perm`` order in
    blocks; within a block, the weights of lowest saliency ``w^2 / [H^-1]_jj`` (current,
    updated ``w``) are pruned and their error is spread over the columns not yet visited.
    Unstructured: block ``b`` prunes its share of ``n_prune`` (cumulative rounding), so the layer
    count is exact. N:M (``nm = (n, m)``): per row, ``m - n`` of every ``m`` consecutive columns
    in ``perm`` order are pruned. Columns past ``n_cols`` (the bias) are never pruned.
    """
    rows, d = W.shape
    perm = torch.arange(n_cols, device=W.device) if perm is None else perm
    full = torch.cat([perm, torch.arange(n_cols, d, device=W.device)])
    Wp = W[:, full].clone()
    Hp = H[full][:, full].double() + lam * torch.eye(d, dtype=torch.float64, device=W.device)
    # upper Cholesky factor of H^-1: row i holds the OBS update of column i onto the columns after it
    L, info = torch.linalg.cholesky_ex(Hp)
    if int(info) != 0:
        Hp = Hp + 1e-8 * torch.diagonal(Hp).mean() * torch.eye(d, dtype=torch.float64, device=W.device)
        L = torch.linalg.cholesky(Hp)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    prune = torch.zeros(rows, n_cols, dtype=torch.bool, device=W.device)
    total = rows * n_cols
    if nm is not None:  # groups must not straddle blocks
        block = max(nm[1], block - block % nm[1])
    done = 0
    for i1 in range(0, n_cols, block):
        i2 = min(i1 + block, n_cols)
        W1 = Wp[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        diag = torch.diagonal(Hinv1)
        if nm is None:
            # this block's share of the layer's count, by cumulative rounding: exact in total
            k = min(round(n_prune * (i2 * rows) / total) - done, W1.numel())
            if i2 == n_cols:
                k = n_prune - done
            done += k
            sal = (W1 ** 2 / diag[None, :] ** 2).flatten()
            mask1 = torch.zeros(W1.numel(), dtype=torch.bool, device=W.device)
            if k > 0:
                mask1[torch.sort(sal, stable=True).indices[:k]] = True
            mask1 = mask1.view_as(W1)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = W1[:, i:i + nm[1]] ** 2 / diag[i:i + nm[1]][None, :] ** 2
                idx = torch.sort(g, dim=1, stable=True).indices[:, :nm[1] - nm[0]]
                mask1[:, i:i + nm[1]].scatter_(1, idx, True)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        prune[:, i1:i2] = mask1
        Wp[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    keep = torch.ones(rows, n_cols, dtype=torch.bool, device=W.device)
    keep[:, perm] = ~prune
    return keep


def nm_column_order(layer: nn.Module, m: int) -> torch.Tensor | None:
    """Column order in which groups of ``m`` input channels at one kernel position are consecutive."""
    w = layer.weight
    c_in = w.shape[1]
    if c_in % m != 0:
        return None
    k = int(w[0, 0].numel())  # kernel positions (1 for Linear)
    return torch.arange(c_in * k, device=w.device).view(c_in, k).T.reshape(-1)


@torch.no_grad()
def fit_layer(name: str, pruned: nn.Module, dense_layer: nn.Module, gram: GramStats, keep: torch.Tensor,
              step: ReconstructStep, bias_to: str | None, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Re-fit ``pruned.<name>`` from its Gram pair; returns the (possibly new, for obs) keep-mask."""
    layer = pruned.get_submodule(name)
    w_d = dense_layer.weight.detach().flatten(1).double()              # (C_out, d)
    rows, d = w_d.shape
    if gram.with_const:
        b_d = dense_layer.bias.detach().double() if dense_layer.bias is not None else w_d.new_zeros(rows)
        w_aug = torch.cat([w_d, b_d[:, None]], 1)
    else:
        w_aug = w_d
    H = gram.H
    lam = damping(H, step.damp, d)
    rhs = gram.R.T + lam * w_aug                                        # rows of X_p^T y_d + lam w_d
    keep2 = keep.flatten(1)
    if step.method == "obs":
        full = torch.ones(rows, w_aug.shape[1], dtype=torch.bool, device=H.device)
        W_star = solve_kept(H, rhs, full, lam)
        perm = nm_column_order(layer, nm[1]) if nm is not None else None
        if nm is not None and perm is None:  # the layer stays dense under N:M: nothing to choose
            keep2 = torch.ones_like(keep2)
        else:
            n_prune = int((~keep2).sum())
            keep2 = obs_select(W_star, H, lam, n_prune, d, nm=nm, block=step.block, perm=perm)
    mask = torch.cat([keep2, keep2.new_ones(rows, 1)], 1) if gram.with_const else keep2
    x = solve_kept(H, rhs, mask.to(H.device), lam)
    w_new = x[:, :d].to(layer.weight.dtype).view_as(layer.weight)
    layer.weight.copy_(w_new)
    if gram.with_const:
        b_new = x[:, d].to(layer.weight.dtype)
        if bias_to == "bias":
            layer.bias.copy_(b_new)
        else:  # BN(y + c) in eval mode equals BN(y) with running_mean - c
            bn = pruned.get_submodule(bias_to)
            bn.running_mean.sub_(b_new.to(bn.running_mean.dtype))
    return keep2.view_as(layer.weight).clone()


# ------------------------------------------------------------- propagation
class _Lockstep:
    """Run the dense and the pruned graph node by node over all batches, pausing before each layer."""

    def __init__(self, dense: nn.Module, pruned: nn.Module, layers: Sequence[str]) -> None:
        names = set(layers)
        self.gd = fx.GraphModule(dense, _SiteLeaves(names).trace(dense))
        self.gp = fx.GraphModule(pruned, _SiteLeaves(names).trace(pruned))
        self.nd, self.np_ = list(self.gd.graph.nodes), list(self.gp.graph.nodes)
        if [n.name for n in self.nd] != [n.name for n in self.np_]:
            raise ValueError("dense and pruned graphs differ")
        calls = [n.target for n in self.nd if n.op == "call_module" and n.target in names]
        if len(calls) != len(set(calls)):
            raise ValueError("a layer is called more than once")
        self.layer_node = {n.target: i for i, n in enumerate(self.nd) if n.op == "call_module" and n.target in names}
        index = {n: i for i, n in enumerate(self.nd)}
        last_use: dict[int, int] = {}
        for i, n in enumerate(self.nd):
            for a in n.all_input_nodes:
                last_use[index[a]] = i
        self.frees: dict[int, list[int]] = {}  # node index -> indices of values no longer needed after it
        for j, i in last_use.items():
            self.frees.setdefault(i, []).append(j)

    def advance(self, interp: fx.Interpreter, nodes: list[fx.Node], env: dict, start: int, stop: int) -> None:
        """Run ``nodes[start:stop]`` on one batch's ``env``, freeing values after their last use."""
        for i in range(start, stop):
            node = nodes[i]
            if node.op in ("placeholder", "output"):
                continue
            interp.env = env
            env[node] = interp.run_node(node)
            for j in self.frees.get(i, ()):
                env.pop(nodes[j], None)


def _first_arg(node: fx.Node) -> fx.Node:
    a = node.args[0]
    if not isinstance(a, fx.Node):
        raise ValueError(f"layer {node.target} is not called on a tensor")
    return a


def _cache_bytes(envs: Iterable[dict]) -> int:
    return sum(v.numel() * v.element_size() for env in envs for v in env.values() if isinstance(v, torch.Tensor))


@torch.no_grad()
def reconstruct(pruned: nn.Module, dense: nn.Module, batches, layers: Sequence[str], step: ReconstructStep,
                masks: dict[str, torch.Tensor] | None = None, nm: tuple[int, int] | None = None,
                device: torch.device | str = "cpu", max_cache_bytes: float = 3e9,
                staged: bool = True) -> ReconstructReport:
    """Re-fit the kept weights of ``layers`` of ``pruned`` (in place), in forward order.

    ``masks``: keep-masks per layer (default: the pruned weights' non-zeros). ``nm``: the N:M
    pattern the masks follow, so ``obs`` re-selects within the same groups. Returns the report
    with the final keep-masks (``obs`` changes them; ``lsq`` keeps them).
    """
    report = ReconstructReport()
    targets = bias_targets(dense)
    todo = []
    for name in layers:
        why = unsupported_reason(pruned.get_submodule(name))
        if why:
            report.skipped[name] = why
        else:
            todo.append(name)
    keep = {n: (masks[n] if masks is not None and n in masks else pruned.get_submodule(n).weight != 0)
            .to(pruned.get_submodule(n).weight.device) for n in layers}
    was_d, was_p = dense.training, pruned.training
    dense.eval()
    pruned.eval()
    try:
        runner = None
        if staged and todo:
            try:
                runner = _Lockstep(dense, pruned, todo)
            except Exception:  # torch.fx cannot trace this model: per-layer passes below
                runner = None
        done: list[str] = []
        if runner is not None:
            report.path = "lockstep"
            try:
                done = _run_lockstep(runner, pruned, dense, batches, todo, step, keep, nm, targets, device,
                                     max_cache_bytes, report)
            except CacheTooLarge:
                report.path = "lockstep, then per-layer passes (memory cap)"
                done = list(report.fitted)
        else:
            report.path = "per-layer passes"
        order = [n for n in _forward_order(dense, todo, batches, device) if n not in done]
        for name in order:
            _fit_by_partial_passes(pruned, dense, batches, name, step, keep, nm, targets, device, report)
    finally:
        dense.train(was_d)
        pruned.train(was_p)
    report.masks = keep
    return report


def _with_const(name: str, targets: dict[str, str | None]) -> bool:
    return targets.get(name) is not None


def _record(report: ReconstructReport, name: str, targets: dict[str, str | None]) -> None:
    report.fitted.append(name)
    t = targets.get(name)
    report.bias[name] = "bias" if t == "bias" else ("next-bn" if t else "none")


def _run_lockstep(runner: _Lockstep, pruned, dense, batches, todo, step, keep, nm, targets, device,
                  max_cache_bytes, report) -> list[str]:
    id_, ip = fx.Interpreter(runner.gd), fx.Interpreter(runner.gp)
    env_d, env_p = [], []
    ph_d = next(n for n in runner.nd if n.op == "placeholder")
    ph_p = next(n for n in runner.np_ if n.op == "placeholder")
    for x, _ in batches:
        x = x.to(device)
        env_d.append({ph_d: x})
        env_p.append({ph_p: x})
    order = sorted(todo, key=lambda n: runner.layer_node[n])
    pos = 0
    for name in order:
        stop = runner.layer_node[name]
        node_d, node_p = runner.nd[stop], runner.np_[stop]
        gram = GramStats(_with_const(name, targets))
        layer, dense_layer = pruned.get_submodule(name), dense.get_submodule(name)
        for ed, ep in zip(env_d, env_p):
            runner.advance(id_, runner.nd, ed, pos, stop)
            runner.advance(ip, runner.np_, ep, pos, stop)
            gram.add(input_patches(layer, ep[_first_arg(node_p)]),
                     output_rows(layer, dense_layer(ed[_first_arg(node_d)])))
        if _cache_bytes(env_d + env_p) > max_cache_bytes:
            raise CacheTooLarge
        keep[name] = fit_layer(name, pruned, dense.get_submodule(name), gram, keep[name], step,
                               targets.get(name), nm)
        _record(report, name, targets)
        pos = stop
    report.passes += 2.0
    return list(report.fitted)


class _Stop(Exception):
    pass


def _layer_inputs(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input of ``model.<name>`` on ``x``; the forward stops right there."""
    got: list[torch.Tensor] = []

    def hook(mod: nn.Module, inp: Any) -> None:
        got.append(inp[0])
        raise _Stop

    with forward_hooks(model, {name: hook}, pre=True, eval_mode=False):
        try:
            model(x)
        except _Stop:
            pass
    return got[0]


def _fit_by_partial_passes(pruned, dense, batches, name, step, keep, nm, targets, device, report) -> None:
    gram = GramStats(_with_const(name, targets))
    layer, dense_layer = pruned.get_submodule(name), dense.get_submodule(name)
    for x, _ in batches:
        x = x.to(device)
        gram.add(input_patches(layer, _layer_inputs(pruned, name, x)),
                 output_rows(layer, dense_layer(_layer_inputs(dense, name, x))))
    keep[name] = fit_layer(name, pruned, dense.get_submodule(name), gram, keep[name], step, targets.get(name), nm)
    _record(report, name, targets)
    report.passes += 2.0


def _forward_order(model: nn.Module, names: Sequence[str], batches, device) -> list[str]:
    order: dict[str, int] = {}

    def make(name: str):
        def hook(mod: nn.Module, inp: Any) -> None:  # a pre-hook's return value would replace the input
            order.setdefault(name, len(order))
        return hook

    with forward_hooks(model, {n: make(n) for n in names}, pre=True):
        model(next(iter(batches))[0][:2].to(device))
    return sorted((n for n in names if n in order), key=order.__getitem__)


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
    b = wP @ H.double()                        # rows: (H w_P)^T; its kept part is H_KP w_P
    delta = solve_kept(H, b, keep, lam)        # A^-1 b_K per row, zero on P
    return (wP * b).sum(1) - (b * delta).sum(1) - lam * (delta * delta).sum(1)
