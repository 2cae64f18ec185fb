"""Propagating calibration batches through a model for the repair steps.

Two ways to reach every repair site or layer with its statistics complete:

- **Node by node** (``StagedRunner`` for channel-wise sites, ``Lockstep`` for
  the dense/pruned pair of a reconstruction): the model is traced with
  ``torch.fx`` (the sites or layers kept as leaves) and run one node at a time
  for all calibration batches at once. At a site, its statistics are complete;
  the step changes the model (and, for channel sites, the cached site output)
  and the run continues downstream. Upstream nodes are never recomputed, so a
  whole step costs about one forward (two for the dense/pruned pair). Values
  are freed after their last user has run: the cache holds the live
  activations of the calibration set at one cut through the network.
- **Partial passes** (``site_moments`` with ``stop_after``, ``layer_inputs``):
  one forward per site or layer that ends right after it (``StopForward``),
  for models ``torch.fx`` cannot trace or whose cache would exceed its cap
  (``CacheTooLarge``).

Models are traced by ``tracing.trace``, which returns ``None`` and why when ``torch.fx`` cannot follow the
forward; every caller falls back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from ..nn.hooks import forward_hooks
from ..nn.stats import ChannelMoments, as_bcx
from ..system.runtime import available_memory_bytes, release_free_memory
from .tracing import trace

if TYPE_CHECKING:
    from .sites import Site

__all__ = [
    "StopForward",
    "CacheTooLarge",
    "ACTIVATION_SHARE",
    "activation_cap",
    "cache_bytes",
    "StagedRunner",
    "Lockstep",
    "site_moments",
    "layer_inputs",
    "call_order",
]

Batches = Iterable[tuple[torch.Tensor, Any]]
Env = dict[fx.Node, Any]


class StopForward(Exception):
    """Raised by a hook once the module of interest has been seen: ends that forward early."""


class CacheTooLarge(Exception):
    """The cached activations would exceed the memory limit: use partial passes."""


# Share of the memory free at the start of a repair that its cached activations may take: the rest is for
# the two models, the Gram matrices and the pruned forward's temporaries (peaks measured at about twice the
# cache on ResNet-50, studies/bench_imagenet_scale.py). Above it the repair takes partial passes.
ACTIVATION_SHARE = 0.4


def activation_cap(device: torch.device | str = "cpu") -> float:
    """Bytes of activations a repair may cache on ``device``: ``ACTIVATION_SHARE`` of its free memory now,
    counting what this process has freed and kept for reuse (handed back first)."""
    release_free_memory(device)
    return ACTIVATION_SHARE * available_memory_bytes(device)


def cache_bytes(envs: Iterable[Env]) -> int:
    """Bytes held by the tensors of node-by-node environments."""
    return sum(v.numel() * v.element_size() for env in envs for v in env.values() if isinstance(v, torch.Tensor))


def _check_cache(envs: Iterable[Env], max_bytes: float) -> None:
    total = cache_bytes(envs)
    if total > max_bytes:
        raise CacheTooLarge(f"{_size(total)} of cached activations, above the cap of {_size(max_bytes)}")


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


class _NodeSequence:
    """A traced model's nodes in order, where each named leaf is called and when each value dies."""

    def __init__(self, gm: fx.GraphModule, names: Collection[str]) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.calls = [n.target for n in self.nodes if n.op == "call_module" and n.target in names]
        self.at = {n.target: i for i, n in enumerate(self.nodes) if n.op == "call_module" and n.target in names}
        last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last_use[a] = i
        self.frees: dict[int, list[fx.Node]] = {}  # node index -> values no longer needed after it
        for n, i in last_use.items():
            self.frees.setdefault(i, []).append(n)

    def envs(self, inputs: list[torch.Tensor]) -> list[Env]:
        """One environment per batch, holding the batch as the graph's input."""
        placeholder = next(n for n in self.nodes if n.op == "placeholder")
        return [{placeholder: x} for x in inputs]

    def advance(self, interp: fx.Interpreter, env: Env, start: int, stop: int, keep: fx.Node | None = None) -> None:
        """Run ``nodes[start:stop]`` on one batch's ``env``, freeing values (except ``keep``) after their last use."""
        for i in range(start, stop):
            node = self.nodes[i]
            if node.op == "placeholder":
                continue
            if node.op == "output":
                break
            interp.env = env
            env[node] = interp.run_node(node)
            for dead in self.frees.get(i, ()):
                if dead is not keep:
                    env.pop(dead, None)


class StagedRunner:
    """Run ``model`` node by node over all batches, pausing at each channel site to correct it."""

    def __init__(self, model: nn.Module, sites: list[Site], max_cache_bytes: float = 4e9) -> None:
        names = {s.name for s in sites}
        t = trace(model, names)
        if t.gm is None:
            raise ValueError(f"torch.fx cannot trace the model ({t.why})")
        self.seq = _NodeSequence(t.gm, names)
        if sorted(self.seq.calls) != sorted(names):  # a site called twice, or inlined: not a clean cut
            raise ValueError("sites are not single call_module nodes")
        self.max_cache_bytes = max_cache_bytes

    @classmethod
    def build(
        cls, model: nn.Module, sites: list[Site], max_cache_bytes: float = 4e9
    ) -> tuple[StagedRunner | None, str]:
        """The runner, or ``None`` and why the model cannot run node by node."""
        try:
            return cls(model, sites, max_cache_bytes), ""
        except ValueError as e:
            return None, str(e)

    def _stages(
        self, batches: Batches, sites: list[Site], device: torch.device | str, at_input: bool
    ) -> Iterator[tuple[Site, fx.Node, list[Env], ChannelMoments]]:
        """Advance every batch to each site in forward order and measure the site's output (or, ``at_input``,
        its input); yields ``(site, node measured, envs, moments)`` and resumes from there, so whatever the
        caller changes (a patched value, a module's statistics) is what runs next. Raises ``CacheTooLarge``."""
        r = self.seq
        interp = fx.Interpreter(r.gm)
        envs = r.envs([x.to(device) for x, _ in batches])
        pos = 0
        was = r.gm.training
        r.gm.eval()
        try:
            for site in sorted(sites, key=lambda s: r.at[s.name]):
                stop = r.at[site.name]
                node = _first_arg(r.nodes[stop]) if at_input else r.nodes[stop]
                end = stop if at_input else stop + 1  # the site itself runs after its input is measured
                mom = ChannelMoments()
                for env in envs:
                    r.advance(interp, env, pos, end, keep=node)
                    mom.add_batch(as_bcx(env[node].float(), site.channel_dim))
                _check_cache(envs, self.max_cache_bytes)
                yield site, node, envs, mom
                pos = end
        finally:
            r.gm.train(was)

    @torch.no_grad()
    def run(
        self,
        batches: Batches,
        sites: list[Site],
        device: torch.device | str,
        correct: Callable[[Site, ChannelMoments], tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """For each site in forward order: moments -> ``correct`` (folds, returns scale/shift) -> patch."""
        with contextlib.closing(self._stages(batches, sites, device, at_input=False)) as stages:
            for site, node, envs, mom in stages:
                scale, shift = correct(site, mom)
                for env in envs:
                    y = env[node]
                    shape = [1] * y.dim()
                    shape[site.channel_dim] = -1
                    env[node] = y * scale.to(y).view(shape) + shift.to(y).view(shape)

    @torch.no_grad()
    def run_inputs(
        self,
        batches: Batches,
        sites: list[Site],
        device: torch.device | str,
        update: Callable[[Site, ChannelMoments], None],
    ) -> None:
        """For each site in forward order: the moments of its *input* -> ``update`` (e.g. a BatchNorm's running
        statistics) -> the site runs as updated. Raises ``CacheTooLarge`` after the sites already updated."""
        with contextlib.closing(self._stages(batches, sites, device, at_input=True)) as stages:
            for site, _, _, mom in stages:
                update(site, mom)


def input_moments(model: nn.Module, site: Site, batches: Batches, device: torch.device | str = "cpu") -> ChannelMoments:
    """Per-channel moments of ``site``'s input over ``batches``; each forward stops right there."""
    mom = ChannelMoments()

    def hook(mod: nn.Module, inp: Any) -> None:
        mom.add_batch(as_bcx(inp[0].float(), site.channel_dim))
        raise StopForward

    with torch.no_grad(), forward_hooks(model, {site.name: hook}, pre=True):
        for x, _ in batches:
            try:
                model(x.to(device))
            except StopForward:
                pass
    return mom


def _first_arg(node: fx.Node) -> fx.Node:
    a = node.args[0]
    if not isinstance(a, fx.Node):
        raise ValueError(f"layer {node.target} is not called on a tensor")
    return a


class Lockstep:
    """Run the dense and the pruned graph node by node over all batches, pausing before each layer."""

    def __init__(self, dense: nn.Module, pruned: nn.Module, layers: Sequence[str]) -> None:
        names = set(layers)
        td, tp = trace(dense, names), trace(pruned, names)
        if td.gm is None or tp.gm is None:
            raise ValueError(f"torch.fx cannot trace the model ({td.why or tp.why})")
        self.d, self.p = _NodeSequence(td.gm, names), _NodeSequence(tp.gm, names)
        if [n.name for n in self.d.nodes] != [n.name for n in self.p.nodes]:
            raise ValueError("dense and pruned graphs differ")
        if len(self.d.calls) != len(set(self.d.calls)):
            raise ValueError("a layer is called more than once")

    @classmethod
    def build(cls, dense: nn.Module, pruned: nn.Module, layers: Sequence[str]) -> tuple[Lockstep | None, str]:
        """The runner, or ``None`` and why the pair cannot run node by node."""
        try:
            return cls(dense, pruned, layers), ""
        except ValueError as e:
            return None, str(e)

    def layers(
        self, batches: Batches, layers: Sequence[str], device: torch.device | str, max_cache_bytes: float
    ) -> Iterator[tuple[str, Iterator[tuple[torch.Tensor, torch.Tensor]]]]:
        """Per layer in graph order: its name and its ``(pruned input, dense input)`` per batch.

        Consume each layer's pairs, and change that layer, before asking for the next layer.
        The pairs raise ``CacheTooLarge`` as soon as the cache exceeds the cap (checked after every batch,
        so memory never grows far past it), before the layer's last pair: the layer is left to the caller's
        partial passes.
        """
        d, p = self.d, self.p
        id_, ip = fx.Interpreter(d.gm), fx.Interpreter(p.gm)
        inputs = [x.to(device) for x, _ in batches]  # one pass over the batches: both graphs see the same images
        env_d, env_p = d.envs(inputs), p.envs(inputs)
        del inputs  # each input is freed once both graphs are past it
        pos = 0
        for name in sorted(layers, key=lambda n: d.at[n]):
            stop = d.at[name]

            def pairs(start: int = pos, stop: int = stop) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                arg_d, arg_p = _first_arg(d.nodes[stop]), _first_arg(p.nodes[stop])
                for ed, ep in zip(env_d, env_p):
                    d.advance(id_, ed, start, stop)
                    p.advance(ip, ep, start, stop)
                    _check_cache(env_d + env_p, max_cache_bytes)
                    yield ep[arg_p], ed[arg_d]

            yield name, pairs()
            pos = stop


@torch.no_grad()
def site_moments(
    model: nn.Module,
    sites: list[Site],
    batches: Batches,
    device: torch.device | str = "cpu",
    stop_after: str | None = None,
) -> dict[str, ChannelMoments]:
    """Per-channel moments of each site's output over ``batches`` (hooks removed on exit).

    With ``stop_after``, each forward ends as soon as that site's output is seen.
    """
    acc = {s.name: ChannelMoments() for s in sites}
    dims = {s.name: s.channel_dim for s in sites}

    def make(name: str):
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            acc[name].add_batch(as_bcx(out.float(), dims[name]))
            if name == stop_after:
                raise StopForward

        return hook

    with forward_hooks(model, {s.name: make(s.name) for s in sites}):
        for x, _ in batches:
            try:
                model(x.to(device))
            except StopForward:
                pass
    return acc


def _layer_input(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input of ``model.<name>`` on ``x``; the forward stops right there."""
    got: list[torch.Tensor] = []

    def hook(mod: nn.Module, inp: Any) -> None:
        got.append(inp[0])
        raise StopForward

    with forward_hooks(model, {name: hook}, pre=True, eval_mode=False):
        try:
            model(x)
        except StopForward:
            pass
    return got[0]


def layer_inputs(
    pruned: nn.Module, dense: nn.Module, name: str, batches: Batches, device: torch.device | str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch, ``(pruned input, dense input)`` of layer ``name``: two partial forwards each."""
    for x, _ in batches:
        x = x.to(device)
        yield _layer_input(pruned, name, x), _layer_input(dense, name, x)


def call_order(model: nn.Module, names: Sequence[str], batches: Batches, device: torch.device | str) -> list[str]:
    """``names`` in the order their modules are first called on two images (never-called ones left out)."""
    order: dict[str, int] = {}

    def make(name: str):
        def hook(mod: nn.Module, inp: Any) -> None:  # a pre-hook's return value would replace the input
            order.setdefault(name, len(order))

        return hook

    with forward_hooks(model, {n: make(n) for n in names}, pre=True):
        model(next(iter(batches))[0][:2].to(device))
    return sorted((n for n in names if n in order), key=order.__getitem__)
