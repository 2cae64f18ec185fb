"""End-to-end scores of a plan on held-out training images: what search allocators minimise.

A candidate is pruned and repaired (the run's pipeline, on the calibration split) and scored per image
against the dense model: KL to the dense logits (label-free), disagreement, or top-1 error. Per-image
losses let a search *screen* a candidate on a seeded random subset of the selection split before paying for
the rest, and let the validation check pair two plans image by image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..evaluation import repaired_model
from ..session import Session
from .objectives import per_image_losses

__all__ = ["SelectionScorer", "Screened", "paired_upper_bound", "NO_SELECTION"]

NO_SELECTION = (
    "{allocator} scores plans on the selection split, but --selection-size is 0: raise it, or name a rule "
    "(e.g. --allocator global)"
)


@dataclass(frozen=True)
class Screened:
    """A candidate's score: ``screen`` on ``n_screen`` images; ``full`` on all (None: stopped early)."""

    screen: float
    full: float | None
    n_screen: int
    n_full: int


def paired_upper_bound(diff: np.ndarray, conf: float = 0.95) -> float:
    """One-sided upper confidence bound of the mean of paired per-image differences (Student t)."""
    from scipy import stats

    d = np.asarray(diff, float)
    if len(d) < 2:
        return float("inf")
    return float(d.mean() + stats.t.ppf(conf, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))


class SelectionScorer:
    """Scores per-layer pruned counts (in the session's layer order) on the selection split.

    ``screen_size`` images (a seeded random subset of the split, the same for every candidate: the split is
    stored in index order, which groups classes in an ImageFolder) give a cheap score; ``score(counts,
    beat=x)`` stops after them when the screen is worse than ``x``.
    """

    def __init__(self, session: Session, repair: str, objective: str = "kl", screen_size: int | None = None) -> None:
        if session.splits.selection.n == 0:
            raise UserError(NO_SELECTION.format(allocator="this run's allocator"))
        if objective == "top1" and not bool((session.splits.selection.y >= 0).all()):
            raise UserError(
                "--objective top1 needs labelled training images, but the selection images are unlabelled: "
                "pass --objective kl or agreement"
            )
        self.session, self.repair, self.objective = session, repair, objective
        self.names = [layer.name for layer in session.layers]
        n = session.splits.selection.n
        self.screen_size = min(n, screen_size if screen_size else max(1, n // 4))
        self.order = np.random.default_rng(int(session.cfg.seed)).permutation(n)  # the seeded screening order
        self.screen_idx = np.sort(self.order[: self.screen_size])
        self.rest_idx = np.sort(self.order[self.screen_size :])
        self.evaluations = 0

    def _counts(self, counts: Any) -> dict[str, int]:
        if isinstance(counts, dict):
            return {k: int(v) for k, v in counts.items()}
        return dict(zip(self.names, (int(k) for k in counts)))

    def losses(self, model: torch.nn.Module, split: str, idx: np.ndarray | None = None) -> np.ndarray:
        """Per-image losses of a (pruned, repaired) model on ``split`` (the images ``idx``, default all)."""
        data = self.session.split(split)
        dense, labels = self.session.dense_logits(split)
        if idx is not None:
            t = torch.as_tensor(idx, dtype=torch.long)
            x, dense, labels = data.x[t], dense[t], labels[t]
        else:
            x = data.x
        bs = data.batch_size
        outs = []
        was = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for i in range(0, len(x), bs):
                    outs.append(model(x[i : i + bs].to(self.session.device)).float().cpu())
        finally:
            model.train(was)
        logits = torch.cat(outs) if outs else torch.empty(0, dense.shape[1])
        return per_image_losses(logits, labels, dense, self.objective)

    def model(self, counts: Any) -> torch.nn.Module:
        model, _ = repaired_model(self.session, self._counts(counts), self.repair)
        return model

    def score(self, counts: Any, beat: float | None = None) -> Screened:
        """Screen on ``screen_size`` images; the full score unless the screen is worse than ``beat``.

        A tie goes on to the full score (0/1 objectives tie often; a strict test would stall the search).
        """
        self.evaluations += 1
        model = self.model(counts)
        head = self.losses(model, "selection", self.screen_idx)
        n = self.session.splits.selection.n
        if beat is not None and float(head.mean()) > beat:
            return Screened(float(head.mean()), None, len(head), n)
        rest = self.losses(model, "selection", self.rest_idx) if len(self.rest_idx) else np.empty(0)
        return Screened(float(head.mean()), float(np.concatenate([head, rest]).mean()), len(head), n)

    def __call__(self, counts: Any) -> float:
        """Full-fidelity loss (every selection image)."""
        return self.score(counts).full
