"""What the allocators are given, computed on a session: the RR profile (from the content-addressed store when
an intact entry has its key), the layers' output sensitivities, and the allocation problem at a budget."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .allocators import AllocationProblem, Needs
from .allocators.rr import LAYER_WEIGHTS
from .errors import UserError
from .profiling.rr import RRProfile, profile_rr
from .profiling.sensitivity import output_sensitivity
from .profiling.store import ProfileCache
from .repair import RepairPipeline
from .session import Session

__all__ = ["profile", "profile_meta", "profile_repair", "profile_key", "layer_weights", "problem"]


def profile_repair(text: str | None) -> tuple[str, float | None]:
    """``(kind, damp)`` of a ``--profile-repair`` value: ``channel``, or ``lsq``/``obs`` with its damping."""
    text = (text or "channel").strip()
    if text == "channel":
        return "channel", None
    head = text.split(":")[0]
    if head not in ("lsq", "obs"):
        raise UserError(f"unknown --profile-repair {text!r}: use channel, lsq[:damp=X|auto] or obs[:damp=X|auto]")
    step = RepairPipeline.parse(text, flag="--profile-repair").steps[0]
    return head, step.damp


def profile_key(session: Session) -> str:
    """The store key of the RR profile: model weights, calibration images, layers and profile settings."""
    kind, damp = profile_repair(session.cfg.profile_repair)
    repair = {} if kind == "channel" else {"profile_repair": kind, "damp": damp}
    return ProfileCache.key(
        {
            "model": session.model_fingerprint,
            "calib": session.data_fingerprints["calib"],
            "layers": [layer.name for layer in session.layers],
            "grid": [float(g) for g in session.grid],
            "lambda": session.cfg.lam,
            "mean_shift": True,
            **repair,
        }
    )


def profile(session: Session) -> RRProfile:
    """The session's RR profile: computed once, from the store when an entry with the same key is intact."""
    if "profile" in session.memo:
        return session.memo["profile"]
    t0 = time.perf_counter()
    cfg = session.cfg
    cache = ProfileCache(session.cache_dir / "profiles") if cfg.cache else None
    key = profile_key(session) if cache else None
    prof = _stored_profile(session, cache, key) if cache else None
    if prof is not None:
        prof.meta["cache"] = "hit"
    else:
        kind, damp = profile_repair(cfg.profile_repair)
        prof = profile_rr(
            session.dense,
            session.splits.calib,
            session.grid,
            session.layers,
            lam=cfg.lam,
            device=session.device,
            progress=session.progress,
            profile_repair=kind,
            damp=damp,
        )
        prof.meta["cache"] = "miss" if cache else "off"
        if cache:
            cache.put(key, prof.to_dict())
    session.timings["profile"] = time.perf_counter() - t0
    session.memo["profile"] = prof
    return prof


def _stored_profile(session: Session, cache: ProfileCache, key: str) -> RRProfile | None:
    """The stored profile when its entry is intact and fits this run (layers x grid), else ``None``: an
    entry edited to another shape, even with its checksum recomputed, is removed and rebuilt."""
    payload = cache.get(key)
    if payload is None:
        return None
    try:
        prof = RRProfile.from_dict(payload)
        shape = (len(session.layers), len(session.grid))
        fits = [layer.name for layer in prof.layers] == [layer.name for layer in session.layers]
        fits = fits and prof.d_raw.shape == shape and prof.d_res.shape == shape and len(prof.grid) == shape[1]
    except (KeyError, TypeError, ValueError):
        fits = False
    if not fits:
        print(f"note: the cached RR profile {cache.path(key)} does not fit this run: rebuilding it", flush=True)
        cache.path(key).unlink(missing_ok=True)
        return None
    return prof


def profile_meta(session: Session) -> dict[str, Any]:
    """The profile's metadata when it was computed or loaded on this session (else empty)."""
    prof = session.memo.get("profile")
    return prof.meta if prof is not None else {}


def layer_weights(session: Session, kind: str | None = None) -> np.ndarray | None:
    """Objective weights ``w_l`` of the RR allocators: ``uniform`` (None) or measured ``sensitivity``."""
    kind = kind or session.cfg.layer_weights
    if kind == "uniform":
        return None
    if kind not in LAYER_WEIGHTS:
        raise UserError(f"unknown --layer-weights {kind!r}: use {' or '.join(LAYER_WEIGHTS)}")
    if "sensitivity" not in session.memo:
        session.memo["sensitivity"] = output_sensitivity(
            session.dense, session.layers, session.splits.calib, session.device
        )
    return session.memo["sensitivity"]


def problem(
    session: Session, budget: float, needs: Needs = Needs(), weights_kind: str | None = None, evaluate: Any = None
) -> AllocationProblem:
    """The allocation problem at ``budget`` with the evidence ``needs`` asks for (and nothing costly else)."""
    n_layers, cfg = len(session.layers), session.cfg
    weights = (
        {layer.name: session.dense.get_submodule(layer.name).weight.detach() for layer in session.layers}
        if needs.weights
        else None
    )
    return AllocationProblem(
        session.layers,
        budget,
        np.zeros(n_layers),
        np.full(n_layers, cfg.s_max),
        unit=cfg.unit,
        macs_per_weight=session.macs_per_weight if cfg.unit == "flops" else None,
        weights=weights,
        profile=profile(session) if needs.profile else None,
        layer_weights=layer_weights(session, weights_kind) if needs.profile else None,
        seed=cfg.seed,
        evaluate=evaluate,
    )
