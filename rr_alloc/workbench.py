"""A loaded experiment: dense model, splits, cached dense outputs, profile and verification.

Everything expensive and plan-independent is computed once and reused by
every plan the workbench allocates and verifies (search, compare, Optuna
trials, studies).
"""

from __future__ import annotations

import copy
import datetime as _dt
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .allocators import AllocationProblem, Needs, allocator_class, get_allocator
from .cache import ProfileCache, fingerprint_model, fingerprint_tensor, usable_cache_dir
from .config import RunConfig, resolve_device
from .data import Splits, load_splits
from .errors import UserError
from .evaluate import Metrics, compare_logits, logits_of
from .hooks import forward_hooks
from .io_utils import sha256_file
from .layers import LayerInfo, prunable_layers
from .models import build_model, default_transform, load_checkpoint
from .plan import LayerPlan, Plan
from .profile import RRProfile, profile_rr, validate_grid
from .pruning import apply_masks, masks_for_plan, nm_masks, parse_pattern
from .repair import DenseSiteCache, RepairPipeline, run_repair
from .optuna_storage import evaluated, study_key_for_workbench
from .repair.reconstruct import DEFAULT_DAMP
from .selection import SelectionScorer, make_objective, paired_upper_bound
from .sensitivity import output_sensitivity

__all__ = ["Workbench", "layer_macs"]


@torch.no_grad()
def layer_macs(model: nn.Module, layers: list[LayerInfo], example: torch.Tensor) -> np.ndarray:
    """Multiply-accumulates per weight of each layer (its output positions) for one image."""
    pos: dict[str, int] = {}

    def make(name: str):
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            per_image = out[0].numel() if out.dim() > 1 else out.numel()
            pos[name] = per_image // mod.weight.shape[0]
        return hook

    with forward_hooks(model, {l.name: make(l.name) for l in layers}):
        model(example[:1])
    # grouped convs: each weight is used once per output position of its own output channel
    return np.array([pos[l.name] for l in layers], dtype=float)


class Workbench:
    """Build once from a ``RunConfig``; then allocate, prune, repair and verify plans."""

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
        self.dense = build_model(cfg.model, cfg.num_classes, cfg.pretrained, cache_dir=str(self.cache_dir))
        if cfg.checkpoint:
            load_checkpoint(self.dense, cfg.checkpoint, map_location="cpu")
        self.dense = self.dense.to(self.device).eval()
        self.layers = prunable_layers(self.dense, cfg.include, cfg.exclude)
        tf = default_transform(cfg.model, cfg.pretrained)
        self.data_spec = cfg.data_spec(tf)
        self.splits: Splits = load_splits(self.data_spec, cfg.batch_size)
        if self.splits.calib.n == 0:
            raise UserError("the calibration split is empty: raise --calib-size")
        if cfg.validation_size == 1:
            raise UserError("--validation-size 1 cannot bound a mean difference: pass 0 (no check) or >= 2")
        self._check_forward()
        self.timings["load"] = time.perf_counter() - t0
        self._dense_logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._profile: RRProfile | None = None
        self._site_cache = DenseSiteCache(self.dense, self.splits.calib, self.device)
        self._macs: np.ndarray | None = None
        self._sensitivity: np.ndarray | None = None
        self._allocations: dict[tuple, dict[str, int]] = {}
        self.search_info: dict[float, dict[str, Any]] = {}  # budget -> provenance of the last search there
        self.last_study: Any = None

    # ----------------------------------------------------------------- basics
    def _check_forward(self) -> None:
        x = self.splits.calib.x[:2].to(self.device)
        try:
            with torch.no_grad():
                out = self.dense.eval()(x)
        except RuntimeError as e:
            raise UserError(f"model {self.cfg.model} cannot run on the {self.cfg.dataset} images "
                            f"{tuple(x.shape[1:])} ({str(e).splitlines()[0]}): pass matching --model/--dataset")
        labels = self.splits.test.y
        if out.dim() != 2 or (len(labels) and int(labels.max()) >= out.shape[1]):
            raise UserError(f"model {self.cfg.model} has {out.shape[-1]} outputs but the data has labels up to "
                            f"{int(labels.max())}: pass --num-classes or the matching model")

    def split(self, name: str):
        if name == "validation":
            if self.splits.validation is None or self.splits.validation.n == 0:
                raise UserError("this run has no validation split: pass --validation-size > 0")
            return self.splits.validation
        return {"calib": self.splits.calib, "selection": self.splits.selection, "test": self.splits.test}[name]

    def dense_logits(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
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

    # --------------------------------------------------------------- profile
    def profile_key(self) -> str:
        return ProfileCache.key({
            "model": fingerprint_model(self.dense), "calib": fingerprint_tensor(self.splits.calib.x),
            "layers": [l.name for l in self.layers], "grid": [float(g) for g in self.grid],
            "lambda": self.cfg.lam, "mean_shift": True, **self._profile_repair_key()})

    def profile_repair(self) -> tuple[str, float]:
        """``(kind, damp)`` of ``cfg.profile_repair``: ``channel``, or ``lsq`` with its damping."""
        text = (self.cfg.profile_repair or "channel").strip()
        if text == "channel":
            return "channel", DEFAULT_DAMP
        head = text.split(":")[0]
        if head == "obs":
            raise UserError("--profile-repair obs has no cheap exact form (OBS chooses its masks in a sequential "
                            "sweep): use --profile-repair lsq (same re-fit, magnitude masks) or channel")
        if head != "lsq":
            raise UserError(f"unknown --profile-repair {text!r}: use channel or lsq[:damp=X]")
        step = RepairPipeline.parse(text).steps[0]
        return "lsq", step.damp

    def _profile_repair_key(self) -> dict[str, Any]:
        kind, damp = self.profile_repair()
        return {} if kind == "channel" else {"profile_repair": kind, "damp": damp}

    def profile(self) -> RRProfile:
        """The RR profile, from the cache when an entry with the same key is intact."""
        if self._profile is not None:
            return self._profile
        t0 = time.perf_counter()
        cache = ProfileCache(self.cache_dir / "profiles") if self.cfg.cache else None
        key = self.profile_key() if cache else None
        hit = cache.get(key) if cache else None
        if hit is not None:
            self._profile = RRProfile.from_dict(hit)
            self._profile.meta["cache"] = "hit"
        else:
            kind, damp = self.profile_repair()
            self._profile = profile_rr(self.dense, self.splits.calib, self.grid, self.layers, lam=self.cfg.lam,
                                       device=self.device, progress=self.progress, profile_repair=kind, damp=damp)
            self._profile.meta["cache"] = "miss" if cache else "off"
            if cache:
                cache.put(key, self._profile.to_dict())
        self.timings["profile"] = time.perf_counter() - t0
        return self._profile

    # ------------------------------------------------------------ allocation
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

    def problem(self, budget: float, needs: Needs = Needs(), layer_weights: str | None = None,
                **extra: Any) -> AllocationProblem:
        """The allocation problem at ``budget`` with the evidence ``needs`` asks for (and nothing costly else)."""
        L = len(self.layers)
        weights = {l.name: self.dense.get_submodule(l.name).weight.detach() for l in self.layers} \
            if needs.weights else None
        return AllocationProblem(
            self.layers, budget, np.zeros(L), np.full(L, self.cfg.s_max), unit=self.cfg.unit,
            macs_per_weight=self.macs_per_weight if self.cfg.unit == "flops" else None,
            weights=weights, profile=self.profile() if needs.profile else None,
            layer_weights=self.layer_weights(layer_weights) if needs.profile else None, seed=self.cfg.seed,
            **extra)

    def achieved(self, counts: dict[str, int], budget: float = 0.5) -> float:
        """Sparsity of ``counts`` in the run's budget unit (weights or MACs)."""
        return self.problem(budget).achieved(counts)

    def allocate(self, allocator: str, budget: float, layer_weights: str | None = None,
                 **kwargs: Any) -> dict[str, int]:
        """``{layer name: pruned count}`` for ``allocator`` at ``budget`` (deterministic ones memoised)."""
        memo_key = (allocator, float(budget), layer_weights or self.cfg.layer_weights, tuple(sorted(kwargs.items())))
        if memo_key in self._allocations:
            return dict(self._allocations[memo_key])
        cls = allocator_class(allocator)
        extra: dict[str, Any] = {}
        scorer = bar = None
        if cls.needs.evaluate:
            scorer = make_objective(self, self.cfg.loop_repair, self.cfg.objective, self.cfg.screen_size)
            extra["evaluate"] = scorer
            key = study_key_for_workbench(self, budget)
            name = self.cfg.study_name or f"rr_alloc-{key}"
            bar, callbacks = self._search_progress()
            extra["options"] = {"n_trials": self.cfg.n_trials, "timeout": self.cfg.timeout,
                                "storage": self.cfg.storage, "study_name": name, "study_key": key,
                                "total_trials": self.cfg.total_trials, "heartbeat_interval": self.cfg.heartbeat_interval,
                                "grace_period": self.cfg.grace_period, "max_retry": self.cfg.max_retry,
                                "optimizer": self.cfg.optimizer, "guidance": self.cfg.guidance,
                                "search_step": self.cfg.search_step, "callbacks": callbacks}
        t0 = time.perf_counter()
        alloc = get_allocator(allocator, **kwargs)
        try:
            k = alloc.allocate(self.problem(budget, cls.needs, layer_weights, **extra))
        finally:
            if bar is not None:
                bar.close()
        counts = {l.name: int(v) for l, v in zip(self.layers, k)}
        if cls.needs.evaluate:
            counts = self._validate_search(counts, budget, alloc, scorer, time.perf_counter() - t0)
        self.timings[f"allocate:{allocator}"] = time.perf_counter() - t0
        if not cls.needs.evaluate:  # search allocators depend on their storage: never memoised
            self._allocations[memo_key] = dict(counts)
        return counts

    def _search_progress(self) -> tuple[Any, list]:
        """A progress bar of the search (trials, best score so far), as an Optuna callback."""
        if not self.progress:
            return None, []
        from optuna.trial import TrialState
        from tqdm.auto import tqdm

        bar = tqdm(total=self.cfg.n_trials or None, desc="search", unit="trial", leave=False)

        def update(study: Any, trial: Any) -> None:
            bar.update(1)
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if done:
                bar.set_postfix_str(f"best {self.cfg.objective} {min(t.value for t in done):.4f}")
        return bar, [update]

    def _validate_search(self, counts: dict[str, int], budget: float, alloc: Any, scorer: SelectionScorer,
                         seconds: float) -> dict[str, int]:
        """Keep a searched plan only when it beats global magnitude on the validation split.

        The paired per-image loss difference (search - global) must have a one-sided 95% upper bound below 0;
        otherwise global magnitude is returned. Without a validation split the plan is kept, unchecked.
        The provenance goes to ``search_info[budget]`` (and into the plan).
        """
        from optuna.trial import TrialState

        study = getattr(alloc, "study", None)
        self.last_study = study
        trials = [t for t in study.get_trials(deepcopy=False) if evaluated(t)] if study is not None else []
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        glob = self.allocate("global", budget)
        anchor = next((t for t in done if t.user_attrs.get("counts") == [glob[n] for n in scorer.names]), None)
        best = min(done, key=lambda t: t.value) if done else None
        info: dict[str, Any] = {
            "optimizer": self.cfg.optimizer, "guidance": self.cfg.guidance if self.cfg.optimizer == "evo" else None,
            "objective": self.cfg.objective, "repair": self.cfg.loop_repair, "trials": len(trials), "complete": len(done),
            "pruned": len(trials) - len(done),  # screened out by evo (trials stopped by --total-trials not counted)
            "screen_size": scorer.screen_size if self.cfg.optimizer == "evo" else None,
            "study_name": study.study_name if study is not None else None,
            "best_selection": best.value if best else None,
            "global_selection": anchor.value if anchor else scorer(glob),
            "selection_size": self.splits.selection.n, "seconds": round(seconds, 1)}
        val = self.splits.validation
        if val is None or val.n == 0:
            info.update(validation_size=0, fallback=None)
        elif counts == glob:
            info.update(validation_size=val.n, fallback=False, note="the search's best plan is global magnitude")
        else:
            mine = scorer.losses(scorer.model(counts), "validation")
            ref = scorer.losses(scorer.model(glob), "validation")
            bound = paired_upper_bound(mine - ref)
            fallback = not bound < 0
            info.update(validation_size=val.n, validation=float(mine.mean()), global_validation=float(ref.mean()),
                        validation_diff=float((mine - ref).mean()), validation_bound=bound, fallback=fallback)
            if fallback:
                counts = dict(glob)
        self.search_info[float(budget)] = info
        return counts

    # ------------------------------------------------------- prune / verify
    def masks(self, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        """Unstructured layer-local magnitude keep-masks for per-layer pruned counts."""
        return masks_for_plan(self.dense, counts)

    @property
    def nm(self) -> tuple[int, int] | None:
        """The run's N:M pattern (``cfg.pattern``), or ``None`` for unstructured plans."""
        return parse_pattern(self.cfg.pattern) if self.cfg.pattern else None

    def nm_masks(self, n: int = 2, m: int = 4) -> dict[str, torch.Tensor]:
        """N:M keep-masks of every layer (layers whose input channels are not a multiple of ``m`` stay dense)."""
        return nm_masks(self.dense, [l.name for l in self.layers], n, m)

    def pattern_masks(self) -> dict[str, torch.Tensor]:
        """Keep-masks of the run's N:M pattern (``cfg.pattern``)."""
        n, m = self.nm
        return self.nm_masks(n, m)

    def pattern_counts(self) -> dict[str, int]:
        """Pruned count per layer under the run's N:M pattern (0 where a layer stays dense)."""
        masks = self.pattern_masks()
        return {l.name: int((~masks[l.name]).sum()) if l.name in masks else 0 for l in self.layers}

    def keep_masks(self, pruning: dict) -> dict[str, torch.Tensor]:
        """Keep-masks from counts (name -> int, magnitude) or from keep-masks as given."""
        if isinstance(pruning, dict) and pruning and isinstance(next(iter(pruning.values())), torch.Tensor):
            return pruning
        return self.masks(pruning)

    def repaired_model(self, pruning, repair: str | RepairPipeline,
                       nm: tuple[int, int] | None = None) -> tuple[nn.Module, Any]:
        """Prune and repair a copy; ``nm`` names the N:M pattern of mask-choosing steps (``obs``)."""
        masks = self.keep_masks(pruning)
        model = copy.deepcopy(self.dense)
        apply_masks(model, masks)
        report = run_repair(model, repair, self.splits.calib, device=self.device, cache=self._site_cache,
                            masks=masks, nm=nm)
        return model, report

    def verify(self, pruning, repair: str | RepairPipeline, split: str = "test",
               nm: tuple[int, int] | None = None) -> Metrics:
        """Prune (counts or masks) -> repair on calibration -> evaluate on ``split`` against the dense model."""
        return self.verify_splits(pruning, repair, (split,), nm=nm)[split]

    def verify_splits(self, pruning, repair: str | RepairPipeline, splits: tuple[str, ...],
                      nm: tuple[int, int] | None = None) -> dict[str, Metrics]:
        """One prune+repair, evaluated on several splits (e.g. selection for choosing, test for reporting)."""
        model, _ = self.repaired_model(pruning, repair, nm=nm)
        out = {}
        for split in splits:
            dense_logits, labels = self.dense_logits(split)
            logits, _ = logits_of(model, self.split(split), self.device)
            out[split] = compare_logits(logits, labels, dense_logits)
        return out

    # ------------------------------------------------------------------ plan
    def source(self) -> dict[str, Any]:
        ck = self.cfg.checkpoint
        return {"model": self.cfg.model, "num_classes": self.cfg.num_classes, "pretrained": self.cfg.pretrained,
                "checkpoint": ck, "checkpoint_sha256": sha256_file(ck) if ck else None,
                "model_fingerprint": fingerprint_model(self.dense),
                "include": list(self.cfg.include), "exclude": list(self.cfg.exclude),
                "data": self.data_spec.to_dict(), "batch_size": self.cfg.batch_size}

    def make_plan(self, counts: dict[str, int], budget: float, allocator: str, repair: str,
                  verify: dict[str, Any] | None = None) -> Plan:
        """The plan document for ``counts``, with everything needed to rebuild and verify it."""
        pipe = RepairPipeline.parse(repair)
        prof = self._profile.meta if self._profile is not None else {}
        return Plan(
            layers=[LayerPlan(l.name, int(counts[l.name]), l.n_weights, l.shape) for l in self.layers],
            budget=budget, allocator=allocator, repair=str(pipe), budget_unit=self.cfg.unit,
            mask_rule=pipe.mask_rule, pattern=self.cfg.pattern,
            achieved_sparsity=self.achieved(counts) if self.cfg.unit == "flops" else None,
            source=self.source(),
            calibration={"size": self.splits.calib.n, "selection_size": self.splits.selection.n,
                         "validation_size": self.splits.validation.n if self.splits.validation else 0,
                         "seed": self.cfg.seed},
            search=dict(self.search_info.get(float(budget), {})) if allocator == "optuna" else {},
            profile={"grid": [float(g) for g in self.grid], "s_max": self.cfg.s_max, "lambda": self.cfg.lam,
                     "layer_weights": self.cfg.layer_weights,
                     **{k: v for k, v in prof.items() if k in ("profile_repair", "n_images")}},
            verify=verify or {},
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
