"""Reconstruction repair: least-squares re-fit of the kept weights (the OBC / SparseGPT family).

Text form: ``lsq[:damp=X]`` or ``obs[:damp=X][:block=B]``; the arithmetic
(Gram matrices, solves, the OBS sweep) is in ``refit.py``.

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

Propagation (``propagate.py``): the dense and the pruned model are traced
with their prunable layers as leaves and run node by node, in lockstep, over
all calibration batches; at each layer both inputs are at hand for every
batch, so the whole reconstruction costs about two forward passes plus the
solves. Models that do not trace, or whose live activations exceed
``max_cache_bytes``, fall back to two partial forwards (dense and pruned) per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..system.progress import bar
from .depthwise import fit_depthwise
from .grams import GroupGrams, layer_grams
from .propagate import CacheTooLarge, Lockstep, activation_cap, call_order, layer_inputs
from .refit import (
    DEFAULT_DAMP,
    DEFAULT_OBS_BLOCK,
    MAX_SOLVE_FLOPS,
    GramStats,
    damp_text,
    damping,
    exact_solve_flops,
    input_patches,
    keep_rows,
    lsq_residuals,
    nm_column_order,
    obs_select,
    output_rows,
    refine_kept,
    solve_all_kept,
    solve_kept,
    sweep,
    unsupported_reason,
    weight_rows,
)
from .sites import conv_consumers
from .tracing import trace

__all__ = [
    "ReconstructStep",
    "reconstruct",
    "input_patches",
    "bias_targets",
    "solve_kept",
    "obs_select",
    "GramStats",
    "output_rows",
    "ReconstructReport",
    "RECONSTRUCT_METHODS",
    "DEFAULT_DAMP",
    "DEFAULT_OBS_BLOCK",
    "MAX_SOLVE_FLOPS",
    "lsq_residuals",
    "damping",
    "unsupported_reason",
    "fit_layer",
    "nm_column_order",
    "fit_groups",
    "layer_grams",
    "GramObserver",
]

RECONSTRUCT_METHODS = ("lsq", "obs")
# conjugate-gradient steps after the sweep: on CIFAR ResNet-20's layers (global 0.9) 25 to 100 steps reach
# the exact re-fit's weights to 1e-8 relative and below (the sweep alone leaves up to 5x its loss); most
# layers stop earlier at the 1e-10 residual
CG_STEPS = 100
SOLVES = ("auto", "exact", "sweep")  # auto: the exact re-fit up to MAX_SOLVE_FLOPS, the sweep above


@dataclass(frozen=True)
class ReconstructStep:
    """``lsq`` or ``obs`` with its damping (fraction of the mean Gram diagonal; ``None``: ``damp=auto``, see
    ``refit.effective_damp``) and OBS block size."""

    method: str = "lsq"
    damp: float | None = None
    block: int = DEFAULT_OBS_BLOCK
    solve: str = "auto"  # exact per-row re-fit, SparseGPT's sweep, or auto: exact where affordable

    def __str__(self) -> str:
        s = self.method
        if self.damp is not None:
            s += f":damp={damp_text(self.damp)}"
        if self.block != DEFAULT_OBS_BLOCK:
            s += f":block={self.block}"
        if self.solve != "auto":
            s += f":solve={self.solve}"
        return s

    def sweeps(self, layer: nn.Module) -> bool:
        """Whether ``layer`` (each of its groups) is re-fitted by the sweep rather than the exact solve."""
        groups = getattr(layer, "groups", 1)
        flops = exact_solve_flops(layer) / groups  # per group: C_out / g rows of C_in / g * k^2 inputs
        return self.solve == "sweep" or (self.solve == "auto" and flops > MAX_SOLVE_FLOPS)


@dataclass
class ReconstructReport:
    """What a reconstruction did: layers re-fitted, layers skipped (with why), passes used."""

    fitted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bias: dict[str, str] = field(default_factory=dict)  # layer -> "bias" | "next-bn" | "none"
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # final keep-masks (obs changes them)
    passes: float = 0.0
    path: str = ""
    untraced: str = ""  # why the lockstep path could not be taken ("" when it was, or was not tried)


def bias_targets(model: nn.Module) -> dict[str, str | None]:
    """Layer name -> where a fitted bias can go: ``"bias"``, the consuming BatchNorm's name, or ``None``."""
    consumers = conv_consumers(trace(model).graph, model)
    out: dict[str, str | None] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out[name] = "bias" if m.bias is not None else consumers.get(name)
    return out


def _obs_keep(
    layer: nn.Module,
    H: torch.Tensor,
    rhs: torch.Tensor,
    lam: float,
    keep2: torch.Tensor,
    step: ReconstructStep,
    nm: tuple[int, int] | None,
) -> torch.Tensor:
    """OBS-chosen keep-mask with the layer's pruned count (or N:M groups) of ``keep2``."""
    perm = nm_column_order(layer, nm[1]) if nm is not None else None
    if nm is not None and perm is None:  # the layer stays dense under N:M: nothing to choose
        return torch.ones_like(keep2)
    W_star = solve_all_kept(H, rhs, lam)  # all columns kept: one shared factorisation
    return obs_select(W_star, H, lam, int((~keep2).sum()), keep2.shape[1], nm=nm, block=step.block, perm=perm)


def _sweep_fit(
    layer: nn.Module,
    H: torch.Tensor,
    rhs: torch.Tensor,
    lam: float,
    keep2: torch.Tensor,
    step: ReconstructStep,
    nm: tuple[int, int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The re-fit without one factorisation per row: SparseGPT's sweep from the all-kept optimum (``obs``
    chooses the masks on the way, with the same count or N:M groups; ``lsq`` removes the given ones), then
    conjugate gradients from the sweep's weights to the exact re-fit of the kept weights.
    ``O(d^3 + CG_STEPS rows d^2)`` instead of ``rows d^3 / 3``."""
    d = keep2.shape[1]
    W_star = solve_all_kept(H, rhs, lam)
    if step.method == "obs":
        perm = nm_column_order(layer, nm[1]) if nm is not None else None
        if nm is not None and perm is None:  # the layer stays dense under N:M
            return torch.ones_like(keep2), W_star
        keep, x = sweep(W_star, H, lam, d, n_prune=int((~keep2).sum()), nm=nm, block=step.block, perm=perm)
    else:
        keep, x = sweep(W_star, H, lam, d, prune=~keep2.to(H.device), block=step.block)
    x = refine_kept(H, rhs, keep_rows(keep, x.shape[1] > d).to(H.device), lam, x, CG_STEPS)
    return keep.to(keep2.device), x


@torch.no_grad()
def fit_layer(
    name: str,
    pruned: nn.Module,
    dense_layer: nn.Module,
    gram: GramStats,
    keep: torch.Tensor,
    step: ReconstructStep,
    bias_to: str | None,
    nm: tuple[int, int] | None = None,
    rows: slice = slice(None),
) -> torch.Tensor:
    """Re-fit the output ``rows`` of ``pruned.<name>`` (all, or one group of a grouped conv) from their Gram
    pair; returns their (possibly new, for obs) keep-mask."""
    layer = pruned.get_submodule(name)
    d = dense_layer.weight[0].numel()
    w_aug = weight_rows(dense_layer, gram.with_const)[rows]  # (rows, d [+1 bias column])
    H = gram.H
    lam = damping(H, step.damp, d, gram.images)
    rhs = gram.R.T + lam * w_aug  # rows of X_p^T y_d + lam w_d
    keep2 = keep.flatten(1)[rows]
    if step.sweeps(layer):
        keep2, x = _sweep_fit(layer, H, rhs, lam, keep2, step, nm)
    else:
        if step.method == "obs":
            keep2 = _obs_keep(layer, H, rhs, lam, keep2, step, nm)
        x = solve_kept(H, rhs, keep_rows(keep2, gram.with_const).to(H.device), lam)
    weight = layer.weight[rows]
    layer.weight[rows] = x[:, :d].to(layer.weight.dtype).view_as(weight)
    if gram.with_const:
        b_new = x[:, d].to(layer.weight.dtype)
        if bias_to == "bias":
            layer.bias[rows] = b_new
        else:  # BN(y + c) in eval mode equals BN(y) with running_mean - c
            bn = pruned.get_submodule(bias_to)
            bn.running_mean[rows] -= b_new.to(bn.running_mean.dtype)
    return keep2.view_as(weight).clone()


def fit_groups(
    name: str,
    pruned: nn.Module,
    dense_layer: nn.Module,
    grams: list[GramStats],
    keep: torch.Tensor,
    step: ReconstructStep,
    bias_to: str | None,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Re-fit every group of ``pruned.<name>`` from its Gram pair (one for an ungrouped layer); returns the
    layer's keep-mask after the fit. A depthwise conv's groups (one output row each) are solved in one batch."""
    g = len(grams)
    og = dense_layer.weight.shape[0] // g
    layer = pruned.get_submodule(name)
    batched = isinstance(grams, GroupGrams) and og == 1 and nm is None
    if batched and not step.sweeps(layer) and keep[0].numel() <= step.block:
        return fit_depthwise(name, pruned, dense_layer, grams, keep, step.method, step.damp, bias_to)
    keep = keep.clone()
    for gi, gram in enumerate(grams):
        rows = slice(gi * og, (gi + 1) * og) if g > 1 else slice(None)
        keep[rows] = fit_layer(name, pruned, dense_layer, gram, keep, step, bias_to, nm, rows)
    return keep


# called with each layer's name and Gram pairs, in forward order, instead of the layer's own re-fit
GramObserver = Callable[[str, list[GramStats]], None]


class _LayerFit:
    """Accumulates one layer's Gram pair from ``(pruned input, dense input)`` batches and re-fits it."""

    def __init__(
        self,
        pruned: nn.Module,
        dense: nn.Module,
        step: ReconstructStep,
        nm: tuple[int, int] | None,
        targets: dict[str, str | None],
        keep: dict[str, torch.Tensor],
        report: ReconstructReport,
        observer: GramObserver | None = None,
    ) -> None:
        self.pruned, self.dense, self.step, self.nm = pruned, dense, step, nm
        self.targets, self.keep, self.report = targets, keep, report
        self.observer = observer
        self.bar: Any = None  # a progress bar over the layers (with the time left), when asked for

    def __call__(self, name: str, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        t = self.targets.get(name)
        layer, dense_layer = self.pruned.get_submodule(name), self.dense.get_submodule(name)
        grams = layer_grams(name, layer, dense_layer, pairs, t is not None)
        if self.observer is not None:  # the observer decides what the layer becomes
            self.observer(name, grams)
        else:
            self.keep[name] = fit_groups(name, self.pruned, dense_layer, grams, self.keep[name], self.step, t, self.nm)
        if self.bar is not None:
            self.bar.update(1)
        self.report.fitted.append(name)
        self.report.bias[name] = "bias" if t == "bias" else ("next-bn" if t else "none")


def _lockstep(
    fit: _LayerFit, batches, todo: list[str], device: torch.device | str, max_cache_bytes: float, staged: bool
) -> list[str]:
    """Fit ``todo`` in one lockstep pass where possible; returns the layers it fitted."""
    report = fit.report
    runner, report.untraced = Lockstep.build(fit.dense, fit.pruned, todo) if staged and todo else (None, "")
    if runner is None:
        report.path = f"per-layer passes ({report.untraced})" if report.untraced else "per-layer passes"
        return []
    report.path = "lockstep"
    try:
        for name, pairs in runner.layers(batches, todo, device, max_cache_bytes):
            fit(name, pairs)
    except CacheTooLarge as e:
        rest = len(todo) - len(report.fitted)
        report.path = f"lockstep, then per-layer passes for the last {rest} layers (memory cap: {e})"
        print(f"note: reconstruction: {report.path}", flush=True)
        return list(report.fitted)
    report.passes += 2.0
    return list(report.fitted)


@torch.no_grad()
def reconstruct(
    pruned: nn.Module,
    dense: nn.Module,
    batches,
    layers: Sequence[str],
    step: ReconstructStep,
    masks: dict[str, torch.Tensor] | None = None,
    nm: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
    max_cache_bytes: float | None = None,
    staged: bool = True,
    progress: bool = False,
    observer: GramObserver | None = None,
) -> ReconstructReport:
    """Re-fit the kept weights of ``layers`` of ``pruned`` (in place), in forward order.

    ``masks``: keep-masks per layer (default: the pruned weights' non-zeros). ``nm``: the N:M
    pattern the masks follow, so ``obs`` re-selects within the same groups. Returns the report
    with the final keep-masks (``obs`` changes them; ``lsq`` keeps them). ``observer``: called with each
    layer's Gram pairs instead of its re-fit (it may write the layer itself: the level database does).
    ``max_cache_bytes``: above it the activations of the lockstep pass give way to per-layer partial passes
    (default ``activation_cap(device)``, a share of the memory free now).
    """
    report = ReconstructReport()
    targets = bias_targets(dense)  # traced in the caller's train/eval mode, before the switch below
    todo = []
    for name in layers:
        why = unsupported_reason(pruned.get_submodule(name))
        if why:
            report.skipped[name] = why
        else:
            todo.append(name)
    keep = {
        n: (masks[n] if masks is not None and n in masks else pruned.get_submodule(n).weight != 0).to(
            pruned.get_submodule(n).weight.device
        )
        for n in layers
    }
    fit = _LayerFit(pruned, dense, step, nm, targets, keep, report, observer)
    was_d, was_p = dense.training, pruned.training
    dense.eval()
    pruned.eval()
    fit.bar = bar(total=len(todo), desc=f"{step.method} reconstruction", unit="layer", disable=not progress)
    try:
        ran = call_order(dense, todo, batches, device)  # a layer the eval forward never reaches has no inputs
        report.skipped.update({n: "never runs in eval mode" for n in todo if n not in ran})
        todo = [n for n in todo if n in ran]
        fit.bar.total = len(todo)
        cap = activation_cap(device) if max_cache_bytes is None else max_cache_bytes
        done = _lockstep(fit, batches, todo, device, cap, staged)
        for name in [n for n in ran if n not in done]:
            fit(name, layer_inputs(pruned, dense, name, batches, device))
            report.passes += 2.0
    finally:
        fit.bar.close()
        dense.train(was_d)
        pruned.train(was_p)
    report.masks = keep
    return report
