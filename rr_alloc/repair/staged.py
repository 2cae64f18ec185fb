"""Sequential site corrections in a single pass over the calibration set.

A channel step measures site ``k``'s pruned statistics *after* the corrections
at sites ``1..k-1``. Recomputing the network from the input for every site
costs one partial forward per site. Instead, the model is traced with
``torch.fx`` (site modules kept as leaves) and run node by node for all
calibration batches at once: when site ``k`` is reached, its statistics are
complete, its correction is folded into the model *and* applied to the
cached site output, and the run continues downstream. Upstream nodes are
never recomputed, so a whole step costs about one forward. Values are freed
as soon as their last user has run; the cache holds the live activations of
the calibration set at one cut through the network.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

from ..stats import ChannelMoments, as_bcx
from .sites import Site

__all__ = ["StagedRunner", "CacheTooLarge"]


class CacheTooLarge(Exception):
    """The cached activations would exceed the memory limit: use the recompute path."""


class _SiteLeaves(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


class StagedRunner:
    """Run ``model`` node by node over all ``batches``, pausing at each site."""

    def __init__(self, model: nn.Module, sites: list[Site], max_cache_bytes: float = 4e9) -> None:
        names = {s.name for s in sites}
        graph = _SiteLeaves(names).trace(model)  # raises on untraceable models: caller falls back
        self.gm = fx.GraphModule(model, graph)
        self.nodes = list(graph.nodes)
        calls = [n.target for n in self.nodes if n.op == "call_module" and n.target in names]
        if sorted(calls) != sorted(names):  # a site called twice, or inlined: not a clean cut
            raise ValueError("sites are not single call_module nodes")
        self.site_node = {n.target: i for i, n in enumerate(self.nodes) if n.op == "call_module" and n.target in names}
        last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last_use[a] = i
        self.frees: dict[int, list[fx.Node]] = {}
        for n, i in last_use.items():
            self.frees.setdefault(i, []).append(n)
        self.max_cache_bytes = max_cache_bytes

    @torch.no_grad()
    def run(self, batches: Iterable[tuple[torch.Tensor, Any]], sites: list[Site], device,
            correct: Callable[[Site, ChannelMoments], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """For each site in forward order: moments -> ``correct`` (folds, returns scale/shift) -> patch."""
        interp = fx.Interpreter(self.gm)
        envs: list[dict[fx.Node, Any]] = []
        for x, _ in batches:
            placeholder = next(n for n in self.nodes if n.op == "placeholder")
            envs.append({placeholder: x.to(device)})
        pos = 0
        order = sorted(sites, key=lambda s: self.site_node[s.name])
        was = self.gm.training
        self.gm.eval()
        try:
            for site in order:
                stop = self.site_node[site.name]
                mom = ChannelMoments()
                for env in envs:
                    self._advance(interp, env, pos, stop)
                    mom.add_batch(as_bcx(env[self.nodes[stop]].float(), site.channel_dim))
                self._check_size(envs)
                scale, shift = correct(site, mom)
                node = self.nodes[stop]
                for env in envs:
                    y = env[node]
                    shape = [1] * y.dim()
                    shape[site.channel_dim] = -1
                    env[node] = y * scale.to(y).view(shape) + shift.to(y).view(shape)
                pos = stop + 1
        finally:
            self.gm.train(was)

    def _advance(self, interp: fx.Interpreter, env: dict[fx.Node, Any], start: int, stop: int) -> None:
        for i in range(start, stop + 1):
            node = self.nodes[i]
            if node.op == "placeholder":
                continue
            if node.op == "output":
                break
            interp.env = env
            env[node] = interp.run_node(node)
            for dead in self.frees.get(i, ()):
                if dead is not self.nodes[stop]:
                    env.pop(dead, None)

    def _check_size(self, envs: list[dict[fx.Node, Any]]) -> None:
        total = sum(v.numel() * v.element_size() for env in envs for v in env.values()
                    if isinstance(v, torch.Tensor))
        if total > self.max_cache_bytes:
            raise CacheTooLarge(f"{total / 1e9:.1f} GB of cached activations")
