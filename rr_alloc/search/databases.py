"""The level search's database on a session: each reconstructed layer's ladder of pruned counts, and the
database of every layer fitted at every level (from the content-addressed store when its key is there)."""

from __future__ import annotations

import time

import numpy as np

from ..repair import RepairPipeline
from ..session import Session
from .level_db import LevelCache, LevelDatabase, build_database, ladder, reconstructed_layers

__all__ = ["level_ladders", "level_database"]


def level_ladders(session: Session, anchor: dict[str, int]) -> dict[str, np.ndarray]:
    """Pruned counts of each level of every reconstructed layer (the anchor's among them; a layer that is
    not prunable has the one level 0: re-fitted to its pruned inputs, never pruned)."""
    prunable, cfg = {layer.name for layer in session.layers}, session.cfg
    return {
        n: ladder(session.dense.get_submodule(n).weight.numel(), cfg.s_max, cfg.ladder_step, [anchor.get(n, 0)])
        if n in prunable
        else np.array([0], np.int64)
        for n in reconstructed_layers(session.dense)
    }


def level_database(session: Session, anchor: dict[str, int], rule: str) -> LevelDatabase:
    """Every reconstructed layer fitted at every ladder level (the anchor's counts among them) by the
    search repair's reconstruction step, under input ``rule``; from the store when its key is there."""
    cfg = session.cfg
    step = RepairPipeline.parse(cfg.loop_repair).steps[0]
    anchor = {n: int(anchor.get(n, 0)) for n in reconstructed_layers(session.dense)}
    ladders = level_ladders(session, anchor)
    parts = {
        "model": session.model_fingerprint,
        "calib": session.data_fingerprints["calib"],
        "repair": str(step),
        "rule": rule,
        "ladders": {n: [int(k) for k in v] for n, v in ladders.items()},
        "anchor": anchor,
    }
    key = LevelCache.key(parts)
    if ("level_database", key) in session.memo:
        return session.memo["level_database", key]
    t0 = time.perf_counter()
    cache = LevelCache(session.cache_dir / "levels") if cfg.cache else None
    db = cache.get(key) if cache else None
    if db is not None:
        db.meta["cache"] = "hit"
    else:
        log = (lambda m: print(m, flush=True)) if session.progress else (lambda m: None)
        db = build_database(
            session.dense,
            session.splits.calib,
            ladders,
            step,
            rule,
            anchor,
            session.device,
            progress=session.progress,
            log=log,
        )
        db.meta["cache"] = "miss" if cache else "off"
        if cache:
            cache.put(key, db)
    db.meta["ladder_step"] = cfg.ladder_step
    session.timings["level_database"] = time.perf_counter() - t0
    session.memo["level_database", key] = db
    return db
