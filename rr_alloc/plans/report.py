"""Tables and figures: terminal summaries, profile CSV and RR-curve plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..profiling.rr import RRProfile
from ..system.files import atomic_path, write_text_atomic
from .plan import Plan

__all__ = [
    "layer_table",
    "write_profile_csv",
    "plot_rr_curves",
    "save_figure",
    "write_frame_csv",
    "search_lines",
    "rule_choice_lines",
    "plot_search_progress",
]


def layer_table(
    plan: Plan, profile: RRProfile | None = None, others: dict[str, dict[str, int]] | None = None
) -> pd.DataFrame:
    """Per-layer sparsity of ``plan`` (and of other plans by name), with the RR at that sparsity."""
    rows = []
    rr_grid, rr_vals = profile.curve("rr") if profile is not None else (None, None)
    idx = {n: i for i, n in enumerate(profile.names)} if profile is not None else {}
    for l in plan.layers:
        row = {"layer": l.name, "weights": l.n_weights, plan.allocator: round(l.sparsity, 4)}
        for name, counts in (others or {}).items():
            row[name] = round(counts[l.name] / l.n_weights, 4)
        if l.name in idx:
            row["RR@s"] = round(float(np.interp(l.sparsity, rr_grid, rr_vals[idx[l.name]])), 3)
        rows.append(row)
    return pd.DataFrame(rows)


def write_frame_csv(df: pd.DataFrame, path: str | Path) -> Path:
    return write_text_atomic(path, df.to_csv(index=False))


def write_profile_csv(profile: RRProfile, path: str | Path) -> Path:
    return write_frame_csv(profile.to_frame(), path)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (format from the suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def plot_rr_curves(
    profile: RRProfile, path: str | Path, plan_sparsity: dict[str, float] | None = None, title: str = ""
) -> Path:
    """Two panels per model: RR(s) and D_res(s) for every layer; markers at the plan's sparsities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    L = len(profile.layers)
    for i, name in enumerate(profile.names):
        color = cmap(i / max(1, L - 1))
        axes[0].plot(profile.grid, profile.rr[i], "-o", ms=3, color=color, label=name)
        axes[1].plot(profile.grid, profile.d_res[i], "-o", ms=3, color=color, label=name)
        if plan_sparsity and name in plan_sparsity:
            s = plan_sparsity[name]
            g, v = profile.curve("d_res")
            axes[1].plot([s], [np.interp(s, g, v[i])], "x", color=color, ms=8)
    axes[0].set(xlabel="layer sparsity", ylabel="RR = D_res / D_raw", title="Relative Repairability")
    # a log axis needs a positive value (constant calibration images can leave every D_res at zero)
    positive = bool((np.asarray(profile.d_res) > 0).any())
    axes[1].set(
        xlabel="layer sparsity",
        ylabel="D_res (relative)",
        yscale="log" if positive else "linear",
        title="Residual distortion after ASR" + (" (x = plan)" if plan_sparsity else ""),
    )
    if L <= 40:
        axes[1].legend(fontsize=6, ncol=2 if L > 12 else 1, loc="lower right")
    if title:
        fig.suptitle(title)
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def rule_choice_lines(info: dict) -> list[str]:
    """How allocator best-rule chose, for the terminal: every rule's selection loss, lowest first, and the
    rule chosen."""
    if not info:
        return []
    scores = info.get("scores") or {}
    ranked = ", ".join(
        f"{r} {v:.4f}" if v is not None else f"{r} n/a" for r, v in sorted(scores.items(), key=_score_order)
    )
    return [
        f"rule choice: {info.get('objective')} after {info.get('repair')} on {info.get('selection_size')} selection "
        f"images: {ranked}; chose {info.get('chosen')}"
    ]


def _score_order(item: tuple[str, float | None]) -> tuple[bool, float]:
    return item[1] is None, item[1] if item[1] is not None else 0.0


def search_lines(info: dict) -> list[str]:
    """What a search did, for the terminal: trials, scores against the anchor rule, the validation check."""
    if not info:
        return []
    opt = info.get("optimizer")
    if info.get("guidance"):
        opt += f" (guidance {info['guidance']}, screen {info.get('screen_size')} images)"
    anchor = info.get("anchor", "global")
    rules = info.get("rule_scores") or {}
    lines = [
        f"search: {opt}, {info.get('trials')} trials ({info.get('pruned', 0)} screened out) in "
        f"{info.get('seconds', 0):.0f}s; {info.get('objective')} after {info.get('repair')} on "
        f"{info.get('selection_size')} selection images: best {info.get('best_selection', float('nan')):.4f}, "
        f"anchor {anchor} {info.get('anchor_selection', float('nan')):.4f}"
    ]
    if rules:
        lines.append("rules on the selection split: " + ", ".join(f"{r} {v:.4f}" for r, v in rules.items()))
    if info.get("fallback") is None:
        lines.append("validation: none (--validation-size 0): the searched plan is returned unchecked")
    elif "validation" in info:
        verdict = (
            f"fallback: the anchor plan ({anchor}) returned (the search did not beat it on validation images)"
            if info["fallback"]
            else f"searched plan kept (beats the anchor {anchor} on validation images)"
        )
        lines.append(
            f"validation ({info['validation_size']} images): {info['validation']:.4f} vs {anchor} "
            f"{info['anchor_validation']:.4f}, paired difference {info['validation_diff']:+.4f} "
            f"(one-sided 95% bound {info['validation_bound']:+.4f}); {verdict}"
        )
    else:
        lines.append(f"validation ({info['validation_size']} images): fallback False ({info.get('note', '')})")
    return lines


def plot_search_progress(
    trials: Sequence, anchor_value: float | None, path: str | Path, title: str = "", anchor: str = "global"
) -> Path:
    """Each trial's score and the best so far (COMPLETE trials), against the anchor rule's score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    done = sorted((t.number, t.value) for t in trials if t.value is not None)
    if done:
        x, y = np.array(done, dtype=float).T
        ax.scatter(x + 1, y, s=8, alpha=0.5, label="full-fidelity trials")
        ax.step(x + 1, np.minimum.accumulate(y), where="post", color="C1", label="best so far")
    screened = [t.number for t in trials if t.value is None and t.user_attrs.get("screen") is not None]
    if screened:
        ax.plot(np.array(screened) + 1, np.full(len(screened), np.nan))  # keeps the x range honest
        ax.text(0.99, 0.98, f"{len(screened)} screened out", transform=ax.transAxes, ha="right", va="top", fontsize=8)
    if anchor_value is not None:
        ax.axhline(anchor_value, color="k", ls="--", lw=0.8, label=f"anchor: {anchor}")
    ax.set(xlabel="trial", ylabel="selection loss", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)
