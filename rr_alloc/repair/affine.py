"""Per-channel corrections, folded into existing parameters where possible.

A correction maps a site's activation ``y`` to ``scale * y + shift`` per
channel. It is folded into the producing layer (conv/linear weight and bias,
BatchNorm affine, or the running mean of a BatchNorm that directly consumes a
bias-free conv). Where no parameter can hold it (a residual block's output,
which the shortcut carries unnormalised), a tiny ``ChannelAffine`` is attached
to the module as child ``rr_affine``; the module's class is swapped for a
subclass that applies it, so every existing parameter keeps its dotted name.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelAffine", "attach_output_affine", "affine_modules", "fold_correction"]

AFFINE_CHILD = "rr_affine"


class ChannelAffine(nn.Module):
    """``y -> scale * y + shift`` along ``channel_dim`` (buffers, not trained)."""

    def __init__(self, channels: int, channel_dim: int = 1) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels))

    def _view(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        return t.view(shape)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self._view(self.scale, y) + self._view(self.shift, y)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, channel_dim={self.channel_dim}"


class _WithOutputAffine:
    """Mixin placed before the module's own class: applies ``rr_affine`` to its output."""

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return getattr(self, AFFINE_CHILD)(super().forward(*args, **kwargs))


_SUBCLASSES: dict[type, type] = {}


def attach_output_affine(module: nn.Module, channels: int, channel_dim: int = 1) -> ChannelAffine:
    """Return ``module``'s output affine, attaching an identity one first if needed."""
    if hasattr(module, AFFINE_CHILD):
        return getattr(module, AFFINE_CHILD)
    cls = type(module)
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"{cls.__name__}WithAffine", (_WithOutputAffine, cls), {})
    ref = next(module.parameters(), None)
    aff = ChannelAffine(channels, channel_dim)
    if ref is not None:
        aff = aff.to(ref.device)
    module.add_module(AFFINE_CHILD, aff)
    module.__class__ = _SUBCLASSES[cls]
    return aff


def affine_modules(model: nn.Module) -> dict[str, ChannelAffine]:
    """Dotted names of the modules that carry an attached output affine."""
    return {name: getattr(m, AFFINE_CHILD) for name, m in model.named_modules() if isinstance(m, _WithOutputAffine)}


def _bc(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(-1, *([1] * (ndim - 1)))


@torch.no_grad()
def fold_correction(
    model: nn.Module,
    name: str,
    kind: str,
    scale: torch.Tensor,
    shift: torch.Tensor,
    consumer_bn: str | None = None,
    channel_dim: int = 1,
) -> str:
    """Make ``model.<name>``'s output ``scale * y + shift``; return where it went.

    Returns ``"folded"`` when the module's own parameters hold it exactly,
    ``"folded-into-next-bn"`` when a bias-free conv's shift went into the running
    mean of the BatchNorm that alone consumes it (exact in eval mode; the conv's
    own output then carries only the scale), and ``"affine"`` when a
    ``ChannelAffine`` had to be attached.
    """
    m = model.get_submodule(name)
    ref = next(iter(m.parameters()), None)
    if ref is None:
        ref = next(iter(m.buffers()), scale)
    scale, shift = scale.to(ref.device), shift.to(ref.device)
    if (
        kind in ("conv", "logits")
        and isinstance(m, (nn.Conv2d, nn.Linear))
        and (m.bias is not None or consumer_bn is not None)
    ):
        w = m.weight
        w.mul_(_bc(scale.to(w.dtype), w.dim()))
        if m.bias is not None:
            m.bias.mul_(scale.to(w.dtype)).add_(shift.to(w.dtype))
        else:
            bn = model.get_submodule(consumer_bn)
            # BN(y + c) in eval mode equals BN(y) with running_mean - c
            bn.running_mean.sub_(shift.to(bn.running_mean.dtype))
            return "folded-into-next-bn"
        return "folded"
    if kind == "bn" and isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)) and m.affine:
        m.weight.mul_(scale.to(m.weight.dtype))
        m.bias.mul_(scale.to(m.bias.dtype)).add_(shift.to(m.bias.dtype))
        return "folded"
    aff = attach_output_affine(m, scale.numel(), channel_dim)
    # compose with an earlier correction: s2 * (s1 y + t1) + t2
    aff.shift.mul_(scale.to(aff.shift.dtype)).add_(shift.to(aff.shift.dtype))
    aff.scale.mul_(scale.to(aff.scale.dtype))
    return "affine"
