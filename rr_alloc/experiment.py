"""A loaded experiment: the dense model, its prunable layers, the data splits and what is computed once.

Everything expensive and plan-independent lives here and is reused by every plan that is allocated and
verified (search, compare, search trials, studies): dense logits per split, MACs per weight, the output
sensitivity of each layer and the RR profile (from the on-disk cache when an intact entry has its key).
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from .allocators import AllocationProblem, Needs
from .cache import ProfileCache, fingerprint_model, fingerprint_tensor, usable_cache_dir
from .config import RunConfig, resolve_device
from .data import Batches, Splits, load_splits
from .errors import UserError
from .evaluate import Metrics, compare_logits, logits_of
from .hooks import forward_hooks
from .io_utils import sha256_file
from .layers import LayerInfo, prunable_layers, weight_aliases
from .level_db import LevelCache, LevelDatabase, build_database, ladder, reconstructed_layers
from .models import build_model, default_transform, load_checkpoint
from .profile import RRProfile, profile_rr, validate_grid
from .repair import RepairPipeline
from .repair.reconstruct import DEFAULT_DAMP, ReconstructStep
from .sensitivity import output_sensitivity

__all__ = ["Experiment", "layer_macs"]


@torch.no_grad()
def layer_macs(model: nn.Module, layers: list[LayerInfo], example: torch.Tensor) -> np.ndarray:
    """Multiply-accumulates per weight of each layer (its output positions) for one image; a weight tensor
    shared with later layers (tied weights) counts their positions too."""
    pos: dict[str, int] = {}
    owner = {layer.name: layer.name for layer in layers}
    owner.update({alias: first for alias, first in weight_aliases(model).items() if first in owner})

    def make(name: str):
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            per_image = out[0].numel() if out.dim() > 1 else out.numel()
            pos[owner[name]] = pos.get(owner[name], 0) + per_image // mod.weight.shape[0]

        return hook

    with forward_hooks(model, {name: make(name) for name in owner}):
        model(example[:1])
    # grouped convs: each weight is used once per output position of its own output channel
    return np.array([pos[layer.name] for layer in layers], dtype=float)


class Experiment:
    """Build once from a ``RunConfig``: model, layers, splits; dense outputs and the RR profile on demand."""

    def __init__(self, cfg: RunConfig, progress: bool = True) -> None:
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
        self.level_rule()  # a contradictory --level-inputs is refused before any work
        self.timings["load"] = time.perf_counter() - t0
        self._dense_logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._profile: RRProfile | None = None
        self._macs: np.ndarray | None = None
        self._sensitivity: np.ndarray | None = None
        self._databases: dict[str, LevelDatabase] = {}

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

    @property
    def macs_per_weight(self) -> np.ndarray:
        if self._macs is None:
            self._macs = layer_macs(self.dense, self.layers, self.splits.calib.x[:1].to(self.device))
        return self._macs

    # ----------------------------------------------------------- profile
    def profile_repair(self) -> tuple[str, float]:
        """``(kind, damp)`` of ``cfg.profile_repair``: ``channel``, or ``lsq``/``obs`` with its damping."""
        text = (self.cfg.profile_repair or "channel").strip()
        if text == "channel":
            return "channel", DEFAULT_DAMP
        head = text.split(":")[0]
        if head not in ("lsq", "obs"):
            raise UserError(f"unknown --profile-repair {text!r}: use channel, lsq[:damp=X] or obs[:damp=X]")
        step = RepairPipeline.parse(text, flag="--profile-repair").steps[0]
        return head, step.damp

    def profile_key(self) -> str:
        """The cache key of the RR profile: model weights, calibration images, layers and profile settings."""
        kind, damp = self.profile_repair()
        repair = {} if kind == "channel" else {"profile_repair": kind, "damp": damp}
        return ProfileCache.key(
            {
                "model": self.model_fingerprint,
                "calib": self.data_fingerprints["calib"],
                "layers": [layer.name for layer in self.layers],
                "grid": [float(g) for g in self.grid],
                "lambda": self.cfg.lam,
                "mean_shift": True,
                **repair,
            }
        )

    def profile(self) -> RRProfile:
        """The RR profile, from the cache when an entry with the same key is intact."""
        if self._profile is not None:
            return self._profile
        t0 = time.perf_counter()
        cache = ProfileCache(self.cache_dir / "profiles") if self.cfg.cache else None
        key = self.profile_key() if cache else None
        hit = self._cached_profile(cache, key) if cache else None
        if hit is not None:
            self._profile = hit
            self._profile.meta["cache"] = "hit"
        else:
            kind, damp = self.profile_repair()
            self._profile = profile_rr(
                self.dense,
                self.splits.calib,
                self.grid,
                self.layers,
                lam=self.cfg.lam,
                device=self.device,
                progress=self.progress,
                profile_repair=kind,
                damp=damp,
            )
            self._profile.meta["cache"] = "miss" if cache else "off"
            if cache:
                cache.put(key, self._profile.to_dict())
        self.timings["profile"] = time.perf_counter() - t0
        return self._profile

    def _cached_profile(self, cache: ProfileCache, key: str) -> RRProfile | None:
        """The cached profile when its entry is intact and fits this run (layers x grid), else ``None``: an
        entry edited to another shape, even with its checksum recomputed, is removed and rebuilt."""
        payload = cache.get(key)
        if payload is None:
            return None
        try:
            prof = RRProfile.from_dict(payload)
            shape = (len(self.layers), len(self.grid))
            fits = [layer.name for layer in prof.layers] == [layer.name for layer in self.layers]
            fits = fits and prof.d_raw.shape == shape and prof.d_res.shape == shape and len(prof.grid) == shape[1]
        except (KeyError, TypeError, ValueError):
            fits = False
        if not fits:
            print(f"note: the cached RR profile {cache.path(key)} does not fit this run: rebuilding it", flush=True)
            cache.path(key).unlink(missing_ok=True)
            return None
        return prof

    @property
    def profile_meta(self) -> dict[str, Any]:
        """The profile's metadata when it was computed or loaded in this run (else empty)."""
        return self._profile.meta if self._profile is not None else {}

    # --------------------------------------------------- level database
    def level_rule(self) -> str | None:
        """How the level search scores candidates (``cfg.level_inputs``: an input rule of the level database,
        or ``off`` for the full sequential pipeline), or ``None`` when the search repair does not reconstruct
        (candidates then move by ``--search-step`` fractions)."""
        rule = self.cfg.level_inputs
        steps = RepairPipeline.parse(self.cfg.loop_repair).steps
        reconstructs = bool(steps) and isinstance(steps[0], ReconstructStep)
        if not reconstructs:
            if rule in ("auto", "off"):
                return None
            raise UserError(
                f"--level-inputs {rule} needs a search repair that starts with a reconstruction (lsq or obs), "
                f"got {self.cfg.loop_repair!r}: pass --search-repair obs>bn>naive@block+logits or --level-inputs off"
            )
        return "anchor" if rule == "auto" else rule

    def level_ladders(self, anchor: dict[str, int]) -> dict[str, np.ndarray]:
        """Pruned counts of each level of every reconstructed layer (the anchor's among them; a layer that is
        not prunable has the one level 0: re-fitted to its pruned inputs, never pruned)."""
        prunable, cfg = {layer.name for layer in self.layers}, self.cfg
        return {
            n: ladder(self.dense.get_submodule(n).weight.numel(), cfg.s_max, cfg.ladder_step, [anchor.get(n, 0)])
            if n in prunable
            else np.array([0], np.int64)
            for n in reconstructed_layers(self.dense)
        }

    def level_database(self, anchor: dict[str, int], rule: str) -> LevelDatabase:
        """Every reconstructed layer fitted at every ladder level (the anchor's counts among them) by the
        search repair's reconstruction step, under input ``rule``; from the cache when its key is there."""
        step = RepairPipeline.parse(self.cfg.loop_repair).steps[0]
        anchor = {n: int(anchor.get(n, 0)) for n in reconstructed_layers(self.dense)}
        ladders = self.level_ladders(anchor)
        parts = {
            "model": self.model_fingerprint,
            "calib": self.data_fingerprints["calib"],
            "repair": str(step),
            "rule": rule,
            "ladders": {n: [int(k) for k in v] for n, v in ladders.items()},
            "anchor": anchor,
        }
        key = LevelCache.key(parts)
        if key in self._databases:
            return self._databases[key]
        t0 = time.perf_counter()
        cache = LevelCache(self.cache_dir / "levels") if self.cfg.cache else None
        db = cache.get(key) if cache else None
        if db is not None:
            db.meta["cache"] = "hit"
        else:
            log = (lambda m: print(m, flush=True)) if self.progress else (lambda m: None)
            db = build_database(
                self.dense, self.splits.calib, ladders, step, rule, anchor, self.device, progress=self.progress, log=log
            )
            db.meta["cache"] = "miss" if cache else "off"
            if cache:
                cache.put(key, db)
        db.meta["ladder_step"] = self.cfg.ladder_step
        self.timings["level_database"] = time.perf_counter() - t0
        self._databases[key] = db
        return db

    # -------------------------------------------------------- allocation
    def layer_weights(self, kind: str | None = None) -> np.ndarray | None:
        """Objective weights ``w_l`` of the RR allocators: ``uniform`` (None) or measured ``sensitivity``."""
        kind = kind or self.cfg.layer_weights
        if kind == "uniform":
            return None
        if kind == "sensitivity":
            if self._sensitivity is None:
                self._sensitivity = output_sensitivity(self.dense, self.layers, self.splits.calib, self.device)
            return self._sensitivity
        raise UserError(f"unknown --layer-weights {kind!r}: use uniform or sensitivity")

    def problem(
        self, budget: float, needs: Needs = Needs(), layer_weights: str | None = None, evaluate: Any = None
    ) -> AllocationProblem:
        """The allocation problem at ``budget`` with the evidence ``needs`` asks for (and nothing costly else)."""
        L = len(self.layers)
        weights = (
            {layer.name: self.dense.get_submodule(layer.name).weight.detach() for layer in self.layers}
            if needs.weights
            else None
        )
        return AllocationProblem(
            self.layers,
            budget,
            np.zeros(L),
            np.full(L, self.cfg.s_max),
            unit=self.cfg.unit,
            macs_per_weight=self.macs_per_weight if self.cfg.unit == "flops" else None,
            weights=weights,
            profile=self.profile() if needs.profile else None,
            layer_weights=self.layer_weights(layer_weights) if needs.profile else None,
            seed=self.cfg.seed,
            evaluate=evaluate,
        )

    def achieved(self, counts: dict[str, int]) -> float:
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
