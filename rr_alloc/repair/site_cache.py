"""The dense model's site statistics and forward order, computed once per calibration set and shared by every
plan repaired against it."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .propagate import site_moments
from .sites import Site, discover_sites, forward_order, missing_note

__all__ = ["DenseSiteCache"]


class DenseSiteCache:
    """Dense-model site statistics and forward order, computed once per calibration set.

    The dense model never changes, so every plan verified against it (each
    Optuna trial, each allocator of a comparison) reuses one dense pass.
    """

    def __init__(self, dense: nn.Module, batches, device: torch.device | str = "cpu") -> None:
        self.dense, self.batches, self.device = dense, batches, device
        self._sites: dict[tuple[str, ...], list[Site]] = {}
        self._moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.notes: list[str] = []  # one line per step whose site kinds the model partly lacks

    def sites(self, kinds: tuple[str, ...], optional: bool = False) -> list[Site]:
        """Sites of ``kinds`` in forward order; kinds the model lacks are skipped, said once in one line.

        A model with none of ``kinds`` is an error, unless ``optional`` (the default pipeline, whose sites
        the user did not choose): then the step is skipped, also said in one line.
        """
        if kinds not in self._sites:
            x0 = next(iter(self.batches))[0][:2].to(self.device)
            missing: list[str] = []
            try:
                found = discover_sites(self.dense, kinds, example=x0, missing=missing)
            except UserError as e:
                if not optional or "does not exist in this model" not in str(e):
                    raise
                note = f"repair step on {'+'.join(kinds)} skipped: {str(e).split(': ', 1)[1].split(';')[0]}"
                if note not in self.notes:
                    self.notes.append(note)
                    print(f"note: {note}", flush=True)
                return []
            if missing:
                self.notes.append(missing_note(kinds, missing))
                print(f"note: {self.notes[-1]}", flush=True)
            self._sites[kinds] = forward_order(self.dense, found, x0)
        return self._sites[kinds]

    def moments(self, sites: list[Site]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        todo = [s for s in sites if s.name not in self._moments]
        if todo:
            for name, m in site_moments(self.dense, todo, self.batches, self.device).items():
                self._moments[name] = (m.mean, m.var)
        return {s.name: self._moments[s.name] for s in sites}
