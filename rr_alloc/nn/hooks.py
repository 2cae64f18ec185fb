"""One scope for forward hooks: registered on named submodules, always removed, mode restored."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn

__all__ = ["forward_hooks"]


@contextlib.contextmanager
def forward_hooks(
    model: nn.Module, hooks: Mapping[str, Callable[..., Any]], pre: bool = False, eval_mode: bool = True
) -> Iterator[nn.Module]:
    """Register ``hooks[name]`` on ``model.<name>`` for the block; remove them and restore the mode on exit.

    ``pre=True`` registers forward pre-hooks (``fn(module, inputs)``; a non-``None`` return
    replaces the inputs), else forward hooks (``fn(module, inputs, output)``). With
    ``eval_mode`` the model runs in eval mode inside the block. Hooks are removed and the
    model's train/eval mode restored in ``finally``, so an exception (including one a hook
    raises to stop a forward early) leaves the model as it was.
    """
    was = model.training
    handles = []
    try:
        if eval_mode:
            model.eval()
        for name, fn in hooks.items():
            mod = model.get_submodule(name)
            handles.append(mod.register_forward_pre_hook(fn) if pre else mod.register_forward_hook(fn))
        yield model
    finally:
        for h in handles:
            h.remove()
        model.train(was)
