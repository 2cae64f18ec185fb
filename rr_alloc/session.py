"""The session: one loaded run (model, prunable layers, data splits) and what is computed once on it.

``Session(cfg)`` loads the dense model and the splits and checks that they fit. Everything expensive and
plan-independent is computed on first use and kept: dense logits per split, MACs per weight, the model and
data fingerprints, the dense statistics repair steps reuse. Derived evidence (the RR profile, level databases,
deterministic allocations, the last repaired copies) is memoised in ``memo`` by the functions that compute it
(``evidence``, ``api``, ``search``, ``evaluation``), keyed by what decides it. The session never changes after
loading: plans are pruned copies.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .data.splits import Batches, Splits, load_splits
from .errors import UserError
from .models import build_model, default_transform, load_checkpoint
from .nn.devices import resolve_device
from .nn.hooks import forward_hooks
from .nn.layers import layer_macs, prunable_layers, weight_aliases
from .nn.metrics import Metrics, compare_logits, logits_of
from .nn.pruning import Pruning, parse_pattern
from .profiling.rr import validate_grid
from .profiling.store import fingerprint_model, fingerprint_tensor, usable_cache_dir
from .repair import DEFAULT_REPAIR, DEFAULT_WITHOUT_BN, DenseSiteCache
from .repair.bn import CalibrationCheck, batchnorms, calibration_check
from .system.files import sha256_file

if TYPE_CHECKING:  # annotations only: the session never imports the option definitions
    from .config.run_config import RunConfig

__all__ = ["Session"]


class Session:
    """Build once from a ``RunConfig``: model, layers, splits; dense outputs and fingerprints on demand."""

    def __init__(self, cfg: RunConfig, progress: bool = True, check_calibration: bool = True) -> None:
        """``check_calibration=False``: leave ``cfg.repair`` as given (a replay repairs with its plan's pipeline,
        so there is no default to adjust)."""
        self.cfg = cfg.validate()
        self.progress = progress
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.grid = validate_grid(cfg.grid, cfg.s_max)
        self.cache_dir = usable_cache_dir(cfg.cache_dir)
        self.dense = build_model(cfg.model, cfg.num_classes, cfg.pretrained)
        if cfg.checkpoint:
            load_checkpoint(self.dense, cfg.checkpoint, map_location="cpu")
        self.dense = self.dense.to(self.device).eval()
        self.layers = prunable_layers(self.dense, cfg.include, cfg.exclude)
        for alias, first in weight_aliases(self.dense).items():
            print(f"note: {alias} shares its weight tensor with {first}: planned once, as {first}")
        self.left_dense: dict[str, str] = {}  # prunable layers left out of the plan, and why
        self.data_spec = cfg.data_spec(default_transform(cfg.model, cfg.pretrained, self.dense))
        self.splits: Splits = load_splits(self.data_spec, cfg.batch_size)
        if self.splits.calib.n == 0:
            raise UserError("the calibration split is empty: raise --calib-size")
        if cfg.validation_size == 1:
            raise UserError("--validation-size 1 cannot bound a mean difference: pass 0 (no check) or >= 2")
        self._check_forward()
        self.calibration = self._check_calibration() if check_calibration else None
        self.timings["load"] = time.perf_counter() - t0
        self._dense_logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.memo: dict[Any, Any] = {}  # derived evidence, keyed by what decides it (see the module docstring)

    def _check_forward(self) -> None:
        """One forward on two calibration images: the model must run on the data, and a layer that never
        runs in eval mode (an auxiliary head) is left dense and named instead of breaking the profile."""
        x = self.splits.calib.x[:2].to(self.device)
        ran: set[str] = set()

        def seen(name: str):
            return lambda mod, inp, out: ran.add(name)

        try:
            with torch.no_grad(), forward_hooks(self.dense, {layer.name: seen(layer.name) for layer in self.layers}):
                out = self.dense.eval()(x)
        except RuntimeError as e:
            raise UserError(
                f"model {self.cfg.model} cannot run on the {self.cfg.dataset} images "
                f"{tuple(x.shape[1:])} ({str(e).splitlines()[0]}): pass matching --model/--dataset"
            )
        if not torch.isfinite(out).all():  # e.g. a negative BatchNorm running_var: every metric would be NaN
            raise UserError(
                f"model {self.cfg.model} gives non-finite outputs (NaN or inf) on the calibration images: check the "
                "checkpoint (BatchNorm running statistics, weights) and the transform"
            )
        idle = [layer.name for layer in self.layers if layer.name not in ran]
        if idle:
            self.left_dense.update({name: "never runs in eval mode" for name in idle})
            self.layers = [layer for layer in self.layers if layer.name in ran]
            print(f"note: left dense, never run in eval mode: {', '.join(idle[:5])}{' ...' if len(idle) > 5 else ''}")
            if not self.layers:
                raise UserError("no prunable layer runs in eval mode: check the model's forward")
        labels = self.splits.test.y
        if out.dim() != 2 or (len(labels) and int(labels.max()) >= out.shape[1]):
            raise UserError(
                f"model {self.cfg.model} has {out.shape[-1]} outputs but the data has labels up to "
                f"{int(labels.max())}: pass --num-classes or the matching model"
            )
        if out.dim() == 2 and self.splits.test_labelled and 0 < self.splits.classes != out.shape[1]:
            print(
                f"note: the data's {self.splits.classes} classes cannot be the model's {out.shape[1]} outputs: "
                "its images are treated as unlabelled (agreement and KL to the dense model, no top-1)",
                flush=True,
            )
            self.splits = self.splits.unlabelled()

    def _check_calibration(self) -> CalibrationCheck | None:
        """Under the default repair, whether BatchNorm recalibration on the calibration images moves the dense
        model itself; when it does, the run's repair is the default without ``bn`` (said in one note line)."""
        s = self.splits
        if self.cfg.repair != DEFAULT_REPAIR or not batchnorms(self.dense):
            return None
        if not s.selection.n:
            print(
                "note: no selection split (--selection-size 0), so the calibration check cannot run: the default "
                "repair keeps bn unchecked; pass --selection-size N (e.g. 128) to check it",
                flush=True,
            )
            return None
        check = calibration_check(self.dense, s.calib, s.selection, self.device)
        if check.moves:
            print(
                f"note: BatchNorm recalibration on the calibration images moves the dense model itself (agreement "
                f"{100 * check.agreement:.1f}% with its dense self on the selection split): the default repair "
                f"leaves bn out ({DEFAULT_WITHOUT_BN}); pass --repair to choose (obs:damp=auto>bn>naive@block+logits "
                "keeps bn)",
                flush=True,
            )
            self.cfg = replace(self.cfg, repair=DEFAULT_WITHOUT_BN)
        return check

    @cached_property
    def model_fingerprint(self) -> str:
        """SHA-256 over the dense model's state (computed once: the dense model never changes)."""
        return fingerprint_model(self.dense)

    @cached_property
    def data_fingerprints(self) -> dict[str, str]:
        """SHA-256 of the decoded calibration, selection and test images (what a replay must see again)."""
        s = self.splits
        return {
            name: fingerprint_tensor(b.x)
            for name, b in (("calib", s.calib), ("selection", s.selection), ("test", s.test))
        }

    # ------------------------------------------------------------ splits
    def split(self, name: str) -> Batches:
        """``calib``, ``selection``, ``validation`` or ``test`` (a missing validation split is a one-line error)."""
        if name == "validation":
            if self.splits.validation is None or self.splits.validation.n == 0:
                raise UserError("this run has no validation split: pass --validation-size > 0")
            return self.splits.validation
        return {"calib": self.splits.calib, "selection": self.splits.selection, "test": self.splits.test}[name]

    def dense_logits(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense model's logits and the labels of ``split`` (computed once)."""
        if split not in self._dense_logits:
            self._dense_logits[split] = logits_of(self.dense, self.split(split), self.device)
        return self._dense_logits[split]

    def dense_metrics(self, split: str = "test") -> Metrics:
        logits, labels = self.dense_logits(split)
        return compare_logits(logits, labels, logits)

    @cached_property
    def macs_per_weight(self) -> np.ndarray:
        """Multiply-accumulates per weight of each prunable layer, for one image."""
        return layer_macs(self.dense, self.layers, self.splits.calib.x[:1].to(self.device))

    @cached_property
    def site_cache(self) -> DenseSiteCache:
        """Dense statistics at repair sites, shared by every plan repaired on this session."""
        return DenseSiteCache(self.dense, self.splits.calib, self.device)

    # ----------------------------------------------------------- pruning
    @property
    def nm(self) -> tuple[int, int] | None:
        """The run's N:M pattern (``cfg.pattern``), or ``None`` for unstructured plans."""
        return parse_pattern(self.cfg.pattern) if self.cfg.pattern else None

    def pruning(self, counts: Mapping[str, int] | None = None) -> Pruning:
        """The run's pruning: its N:M pattern over every layer, else the given per-layer ``counts``."""
        if self.nm is not None:
            return Pruning(nm=self.nm, layers=tuple(layer.name for layer in self.layers))
        if counts is None:
            raise ValueError("an unstructured run prunes per-layer counts: pass them")
        return Pruning(counts=dict(counts))

    def achieved(self, counts: Mapping[str, int]) -> float:
        """Sparsity of ``counts`` in the run's budget unit (weights or MACs); no budget or bound is involved."""
        n = np.array([layer.n_weights for layer in self.layers], float)
        cost = n if self.cfg.unit == "weights" else n * self.macs_per_weight
        pruned = np.array([counts[layer.name] for layer in self.layers], float)
        return float(cost @ (pruned / n) / cost.sum())

    # -------------------------------------------------------------- plan
    def source(self) -> dict[str, Any]:
        """The plan's ``source`` block: what rebuilds this model and data."""
        ck = self.cfg.checkpoint
        return {
            "model": self.cfg.model,
            "num_classes": self.cfg.num_classes,
            "pretrained": self.cfg.pretrained,
            "checkpoint": ck,
            "checkpoint_sha256": sha256_file(ck) if ck else None,
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": dict(self.data_fingerprints),
            "include": list(self.cfg.include),
            "exclude": list(self.cfg.exclude),
            "data": self.data_spec.to_dict(),
            "batch_size": self.cfg.batch_size,
            **({"left_dense": dict(self.left_dense)} if self.left_dense else {}),
        }
