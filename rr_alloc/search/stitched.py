"""Level candidates, staged scores: stitched from the level database with the cheap rest of the repair, or
(the reference) pruned and repaired by the full sequential pipeline.

A candidate's model is the dense model with every layer's database entry at the candidate's level (what the
pipeline's reconstruction step would have produced under the database's input rule), then the steps of the
search repair after the reconstruction (e.g. ``bn>naive@block+logits``) on the calibration split. It is
scored on the selection split in *stages* of growing, nested, seeded image subsets: after each stage a child
whose mean loss is worse than its parent's on the same images stops (EvoPress's staged selection, for a
(1 + 1) search whose every candidate is an Optuna trial). Plans that are kept (the validation check, the
verification) always go through the full sequential pipeline (``model``), never the stitched one.
``SequentialLevelScorer`` scores the same levels, stages included, with the full pipeline per candidate:
what the stitched score approximates, at a full reconstruction per candidate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..repair import RepairPipeline, run_repair
from ..session import Session
from .level_db import LevelDatabase
from .scoring import SelectionScorer

__all__ = ["LevelScorer", "StitchedScorer", "SequentialLevelScorer", "Staged", "default_stages"]


def default_stages(n: int) -> tuple[int, ...]:
    """Screening stages of a selection split of ``n`` images: an eighth and a half (each at least 16)."""
    return tuple(sorted({k for k in (max(16, n // 8), max(16, n // 2)) if k < n}))


@dataclass(frozen=True)
class Staged:
    """A stitched candidate's score: mean loss after each stage it reached; ``full`` None when it stopped."""

    stages: tuple[float, ...]
    sizes: tuple[int, ...]
    full: float | None


class LevelScorer(SelectionScorer):
    """Staged scores of per-layer levels (``{layer: level}``) on ``ladders`` (layer -> pruned counts of each
    level); ``candidate`` builds a candidate's repaired model."""

    def __init__(
        self,
        session: Session,
        repair: str,
        ladders: Mapping[str, np.ndarray],
        objective: str = "kl",
        stages: Sequence[int] = (),
    ) -> None:
        n = session.splits.selection.n
        sizes = tuple(sorted({int(k) for k in stages if 0 < int(k) < n})) if stages else default_stages(n)
        super().__init__(session, repair, objective, sizes[0] if sizes else n)
        self.ladders = dict(ladders)
        self.sizes = sizes
        bounds = (0, *sizes, n)
        self.chunks = [np.sort(self.order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]  # nested stages
        self.level_evaluations = 0

    def all_levels(self, levels: Mapping[str, int]) -> dict[str, int]:
        """Levels of every laddered layer: ``levels``, and level 0 (count 0) for layers left out of the plan."""
        return {n: int(levels.get(n, 0)) for n in self.ladders}

    def candidate(self, levels: Mapping[str, int]) -> torch.nn.Module:
        """The candidate's repaired model at ``levels``."""
        raise NotImplementedError

    def score_levels(self, levels: Mapping[str, int], beat: Sequence[float] | None = None) -> Staged:
        """Stage by stage; stops after a stage whose mean is worse than ``beat``'s (the parent's) there.

        A tie goes on (0/1 objectives tie often). ``beat``: the parent's stage means (``Staged.stages``).
        """
        self.level_evaluations += 1
        model = self.candidate(levels)
        losses: list[np.ndarray] = []
        means: list[float] = []
        for i, idx in enumerate(self.chunks):
            losses.append(self.losses(model, "selection", idx))
            mean = float(np.concatenate(losses).mean())
            if i == len(self.chunks) - 1:
                return Staged(tuple(means), self.sizes, mean)
            means.append(mean)
            if beat is not None and i < len(beat) and mean > beat[i]:
                return Staged(tuple(means), self.sizes, None)
        raise AssertionError("unreachable: the last chunk returns")


class StitchedScorer(LevelScorer):
    """Scores per-layer levels of ``db`` stitched into the dense model."""

    def __init__(
        self,
        session: Session,
        repair: str,
        db: LevelDatabase,
        objective: str = "kl",
        stages: Sequence[int] = (),
    ) -> None:
        super().__init__(session, repair, db.counts, objective, stages)
        self.db = db
        self.rest = RepairPipeline(RepairPipeline.parse(repair).steps[1:])  # after the reconstruction step

    def candidate(self, levels: Mapping[str, int]) -> torch.nn.Module:
        return self.stitched(levels)

    def stitched(self, levels: Mapping[str, int]) -> torch.nn.Module:
        """The candidate's model: database entries at ``levels``, then the cheap rest of the repair."""
        session = self.session
        model, masks = self.db.stitch(session.dense, levels)
        run_repair(
            model,
            self.rest,
            session.splits.calib,
            device=session.device,
            cache=session.site_cache,
            masks=masks,
            optional_sites=True,
        )
        return model


class SequentialLevelScorer(LevelScorer):
    """Scores per-layer levels through the full sequential pipeline: each candidate pruned at its levels'
    counts and repaired as a verification would (the reference the stitched score approximates)."""

    def candidate(self, levels: Mapping[str, int]) -> torch.nn.Module:
        counts = {n: int(self.ladders[n][levels.get(n, 0)]) for n in self.names}
        return self.model(counts)
