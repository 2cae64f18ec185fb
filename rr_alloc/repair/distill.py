"""The ``kd`` repair step: distil the kept weights to the dense model on unlabeled images.

Every other step is layer-local or statistics-only; this one fits the pruned network as a whole to what the
dense network outputs. Adam on the kept weights (and, with ``params=all``, biases and BatchNorm affines),
masks fixed, the model in eval mode (BatchNorm uses its running statistics, so the function trained is the
function evaluated), a cosine learning rate, and no labels:

- ``loss=kl``: ``KL(p_dense || p_pruned)`` on the logits;
- ``loss=block``: each residual block's output error and the logits' error, each normalised by the dense
  output's energy and summed (OBC's global AdaPrune, ``--gap``, at block granularity);
- ``loss=kl+block``: both (default).

The defaults (600 steps of 64 images, lr 3e-3, both losses, weights, biases and BatchNorm affines trained,
flips and crops) won the screen of ``studies/distill_repair.py`` on the selection split.

Masks stay exact: gradients of pruned weights are zeroed before each update and the weights are multiplied
by their masks after it, so per-layer counts and N:M groups never change. Images come from
``StepContext.distill_batches`` (the calibration split plus ``--distill-size`` further training images),
drawn and augmented (flips, padded crops) from a generator seeded by the run's seed: the same seed gives the
same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..nn.hooks import forward_hooks
from .sites import discover_sites
from .steps import StepContext, StepKind, first_repeat, register

__all__ = ["DistillStep", "Distillation", "distill", "LOSSES", "AUGMENTATIONS", "PARAMS"]

LOSSES = ("kl", "block", "kl+block")
AUGMENTATIONS = ("none", "flip", "crop", "flip+crop")
PARAMS = ("weights", "all")


@dataclass(frozen=True)
class DistillStep:
    """``kd`` with its settings (defaults measured in ``studies/distill_repair.py``)."""

    steps: int = 600
    lr: float = 3e-3
    batch: int = 64
    loss: str = "kl+block"
    aug: str = "flip+crop"
    params: str = "all"

    def __str__(self) -> str:
        s = "kd"
        for key, default in _DEFAULTS.items():
            value = getattr(self, key)
            if value != default:
                s += f":{key}={value:g}" if isinstance(value, float) else f":{key}={value}"
        return s

    def settings(self) -> dict[str, Any]:
        """Every setting, defaults included (what a plan records)."""
        return {k: getattr(self, k) for k in _DEFAULTS}


_DEFAULTS: dict[str, Any] = {k: getattr(DistillStep, k) for k in ("steps", "lr", "batch", "loss", "aug", "params")}
_USAGE = "kd[:steps=N][:lr=X][:batch=B][:loss=kl|block|kl+block][:aug=none|flip|crop|flip+crop][:params=weights|all]"


def _parse(opts: list[str], part: str, text: str) -> DistillStep:
    twice = first_repeat([o.partition("=")[0] for o in opts])
    if twice:
        raise UserError(f"option {twice!r} is given twice in repair step {part!r} (in --repair {text!r}): keep one")
    values: dict[str, Any] = {}
    for o in opts:
        key, _, val = o.partition("=")
        if key not in _DEFAULTS or not val:
            raise UserError(f"unknown option {o!r} in repair step {part!r}: use {_USAGE} (e.g. kd:steps=300)")
        try:
            if key in ("steps", "batch"):
                values[key] = int(val)
                if not 1 <= values[key] <= 10_000_000:
                    raise ValueError
            elif key == "lr":
                values[key] = float(val)
                if not 0 < values[key] <= 1:  # also refuses nan and inf
                    raise ValueError
            elif val in {"loss": LOSSES, "aug": AUGMENTATIONS, "params": PARAMS}[key]:
                values[key] = val
            else:
                raise ValueError
        except ValueError:
            raise UserError(
                f"bad value in {o!r} of repair step {part!r} (in --repair {text!r}): steps and batch are positive "
                f"integers, lr a number in (0, 1], loss one of {', '.join(LOSSES)}, aug one of "
                f"{', '.join(AUGMENTATIONS)}, params one of {', '.join(PARAMS)}"
            )
    return DistillStep(**values)


def _augment(x: torch.Tensor, aug: str, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and/or random crops of an eighth of the side, zero-padded (per image)."""
    if "flip" in aug:
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if "crop" in aug and x.dim() == 4:
        h, w = x.shape[-2:]
        pad = max(1, round(min(h, w) / 8))
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (len(x),), generator=g).tolist()
        dx = torch.randint(0, 2 * pad + 1, (len(x),), generator=g).tolist()
        x = torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(zip(dy, dx))])
    return x


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")


class _BlockOutputs:
    """Records each residual block's output during one forward (the dense and the pruned model alike)."""

    def __init__(self, model: nn.Module, blocks: list[str]) -> None:
        self.model, self.blocks, self.out = model, blocks, {}

    def __call__(self):  # a context manager over the model's forward hooks
        def make(name: str):
            def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
                self.out[name] = out

            return hook

        return forward_hooks(self.model, {b: make(b) for b in self.blocks})


def _trainable(model: nn.Module, params: str) -> list[nn.Parameter]:
    keep: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            keep.append(m.weight)
        if params == "all" and isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm.BatchNorm2d, nn.BatchNorm1d)):
            keep += [p for p in (m.bias, getattr(m, "weight", None)) if isinstance(p, nn.Parameter)]
    return list({id(p): p for p in keep}.values())


@dataclass
class DistillResult:
    """What a distillation did: its loss on the first and last steps, images seen, seconds."""

    loss_first: float
    loss_last: float
    images: int
    seconds: float


def distill(
    pruned: nn.Module,
    dense: nn.Module,
    images: torch.Tensor,
    step: DistillStep,
    masks: dict[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> DistillResult:
    """Fit ``pruned`` (in place) to ``dense`` on ``images`` with ``step``; masked weights stay exactly zero.

    ``masks``: keep-masks by layer name; a Conv2d/Linear without one keeps its current zeros.
    """
    from ..system.progress import bar

    t0 = time.perf_counter()
    blocks: list[str] = []
    if "block" in step.loss:
        blocks = [s.name for s in discover_sites(dense, ("block",), example=images[:2].to(device))]
    keep = _kept_weights(pruned, masks)
    trainable = _trainable(pruned, step.params)
    flags = {p: p.requires_grad for p in pruned.parameters()}
    for p in pruned.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trainable, lr=step.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / step.steps)))
    g = torch.Generator().manual_seed(int(seed))
    dense_blocks, pruned_blocks = _BlockOutputs(dense, blocks), _BlockOutputs(pruned, blocks)
    was_training = pruned.training
    pruned.eval()
    order: list[int] = []
    losses: list[float] = []
    try:
        it = bar(range(step.steps), desc="distilling (kd)", disable=not progress)
        for _ in it:
            if len(order) < step.batch:  # epochs of a seeded permutation
                order += torch.randperm(len(images), generator=g).tolist()
            idx, order = order[: step.batch], order[step.batch :]
            x = _augment(images[idx], step.aug, g).to(device)
            with torch.no_grad(), dense_blocks():
                teacher = dense(x)
            with pruned_blocks():
                student = pruned(x)
            pairs = [(pruned_blocks.out[b], dense_blocks.out[b]) for b in blocks]
            loss = _loss(step, student, teacher, pairs)
            _masked_update(opt, sched, loss, keep)
            losses.append(float(loss.detach()))
            if progress:
                it.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        pruned.train(was_training)
    return DistillResult(losses[0], losses[-1], len(images), time.perf_counter() - t0)


def _kept_weights(pruned: nn.Module, masks: dict[str, torch.Tensor] | None) -> dict[nn.Parameter, torch.Tensor]:
    """Each Conv2d/Linear weight and its keep-mask (given, else its current non-zeros)."""
    keep: dict[nn.Parameter, torch.Tensor] = {}
    for name, m in pruned.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            mask = masks.get(name) if masks else None
            keep[m.weight] = (m.weight != 0) if mask is None else mask.to(m.weight.device, torch.bool)
    return keep


def _loss(
    step: DistillStep, student: torch.Tensor, teacher: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """KL to the dense logits and/or each block's output error normalised by the dense output's energy."""
    loss = student.new_zeros(())
    if "kl" in step.loss:
        loss = loss + _kl(student, teacher)
    if "block" in step.loss:  # every block's output, then the network's own
        for s, t in [*blocks, (student, teacher)]:
            loss = loss + (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
    if not torch.isfinite(loss):
        raise UserError(f"the kd repair step diverged (loss {loss.item()}) at lr={step.lr:g}: pass a lower kd:lr=X")
    return loss


def _masked_update(opt: torch.optim.Optimizer, sched: Any, loss: torch.Tensor, keep: dict) -> None:
    """One optimiser step in which pruned weights get no gradient and stay exactly zero (Adam's moments and
    weight decay could otherwise move them)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p, mask in keep.items():
        if p.grad is not None:
            p.grad.mul_(mask)
    opt.step()
    sched.step()
    with torch.no_grad():
        for p, mask in keep.items():
            p.mul_(mask)


@register
class Distillation(StepKind):
    """``kd``: distil the kept weights to the dense model on unlabeled images (masks fixed)."""

    methods = ("kd",)
    usage = "kd[:steps=N][:lr=X][:loss=kl|block|kl+block]"
    usage_rank = 3
    grammar = _USAGE
    rewrites_weights = True

    def owns(self, step) -> bool:
        return isinstance(step, DistillStep)

    def parse(self, part: str, text: str) -> DistillStep | None:
        head, *opts = part.split(":")
        return _parse(opts, part, text) if head == "kd" else None

    def apply(self, step: DistillStep, pruned: nn.Module, ctx: StepContext) -> None:
        if ctx.dense is None:
            raise ValueError("the kd repair step needs the dense model")
        batches = ctx.distill_batches if ctx.distill_batches is not None else ctx.batches
        images = batches.x if hasattr(batches, "x") else torch.cat([x for x, _ in batches])
        res = distill(pruned, ctx.dense, images, step, ctx.masks, ctx.device, ctx.seed, ctx.progress)
        ctx.report.distill = {
            **step.settings(),
            "images": res.images,
            "loss_first": round(res.loss_first, 6),
            "loss_last": round(res.loss_last, 6),
            "seconds": round(res.seconds, 1),
        }
        ctx.report.calib_passes += step.steps * step.batch / max(1, len(images))
