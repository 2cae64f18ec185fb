"""Per-layer output sensitivity: how much local distortion at a layer moves the logits.

The unweighted RR objective treats a unit of relative distortion equally in
every layer; it is not (METHOD.md section 5 probe). This measures, for each
prunable layer, the mean ``KL(p_dense || p_noisy)`` when noise of relative
power ``eps`` (per channel, ``eps * v_d,i``) is added to that layer's output
alone, divided by ``eps``: a first-order weight for ``D_res``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.hooks import forward_hooks
from ..nn.layers import LayerInfo
from ..nn.stats import ChannelMoments, as_bcx

__all__ = ["output_sensitivity"]


@torch.no_grad()
def output_sensitivity(
    model: nn.Module,
    layers: list[LayerInfo],
    batches,
    device: torch.device | str = "cpu",
    eps: float = 0.05,
    max_images: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """``(L,)`` array of ``KL / eps`` per layer, normalised to mean 1."""
    xs = []
    n = 0
    for x, _ in batches:
        xs.append(x)
        n += len(x)
        if n >= max_images:
            break
    x = torch.cat(xs)[:max_images].to(device)
    with forward_hooks(model, {}):  # eval mode for the whole measurement, restored after
        logp_d = F.log_softmax(model(x).double(), 1)
        out = np.zeros(len(layers))
        for i, l in enumerate(layers):
            mod = model.get_submodule(l.name)
            cdim = -1 if isinstance(mod, nn.Linear) else 1
            mom = ChannelMoments()
            with forward_hooks(model, {l.name: lambda m, inp, o: mom.add_batch(as_bcx(o.float(), cdim))}):
                model(x)
            std = (eps * mom.var).sqrt().float().to(device)
            g = torch.Generator(device="cpu").manual_seed(seed + i)

            def noisy(m: nn.Module, inp: Any, o: torch.Tensor) -> torch.Tensor:
                shape = [1] * o.dim()
                shape[cdim] = -1
                noise = torch.randn(o.shape, generator=g).to(o.device, o.dtype)
                return o + noise * std.view(shape)

            with forward_hooks(model, {l.name: noisy}):
                logp = F.log_softmax(model(x).double(), 1)
            out[i] = float((logp_d.exp() * (logp_d - logp)).sum(1).mean()) / eps
    return out / max(out.mean(), 1e-300)
