"""What ``--allocator best-rule`` would have chosen in every committed cell where all five rules were measured.

No model runs here: the rows come from two studies' committed results, where each rule's plan was pruned,
repaired and scored on the selection split (KL to the dense model) and reported on images no choice saw.
``best-rule`` returns the plan of the rule with the lowest selection KL (ties to global magnitude), so its
result in a cell is that rule's row. Reported: which rule it picks, and its difference to global magnitude
(the CLI's former default) and to the best rule in hindsight (the oracle no tool can know).

- CIFAR ResNet-20/32 (``studies/results/level_search/compare*.csv``): ``obs>bn>naive@block+logits``, 1024
  selection images, test top-1 (%); rr-greedy plans on the ``obs`` profile.
- EfficientNet-Lite1/Lite2 (``studies/results/edge_allocation/results.csv``): 128 selection photos from
  ``pool/``, agreement (%) with the dense model on the 300 ``fidelity/`` photos; every pipeline measured.

    python studies/rule_choice.py          # writes studies/results/rule_choice/rule_choice.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from common import ROOT, ci_text, run_main, write_report

from rr_alloc.allocators import RULES

RESULTS = ROOT / "studies" / "results"


def cifar_cells() -> pd.DataFrame:
    """One row per (model, budget, seed, rule): selection KL and test top-1 (%), from the level search's CSVs."""
    frames = [pd.read_csv(p) for p in sorted((RESULTS / "level_search").glob("compare*.csv"))]
    df = pd.concat(frames)
    df = df[df.plan.isin(RULES) & (df.guidance == "rr")].drop_duplicates(["model", "budget", "seed", "plan", "split"])
    sel = df[df.split == "selection"].set_index(["model", "budget", "seed", "plan"]).kl.rename("selection_kl")
    test = df[df.split == "test"].set_index(["model", "budget", "seed", "plan"]).top1.rename("reported") * 100
    out = pd.concat([sel, test], axis=1).reset_index().rename(columns={"budget": "sparsity", "plan": "rule"})
    return out.assign(pipeline="obs>bn>naive@block+logits")


def edge_cells() -> pd.DataFrame:
    """One row per (model, sparsity, pipeline, seed, rule): selection KL and fidelity agreement (%)."""
    df = pd.read_csv(RESULTS / "edge_allocation" / "results.csv")
    df = df[df.plan.isin(RULES)].rename(columns={"plan": "rule"})
    return df.assign(reported=100 * df.fidelity_agreement)[
        ["model", "sparsity", "pipeline", "seed", "rule", "selection_kl", "reported"]
    ]


def choices(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (model, sparsity, pipeline, seed) with every rule: the rule best-rule picks and its differences."""
    rows = []
    for (m, s, pipe, seed), g in cells.groupby(["model", "sparsity", "pipeline", "seed"]):
        if set(g.rule) != set(RULES):
            continue
        g = g.set_index("rule").loc[list(RULES)]  # the tool's tie order: global magnitude first
        pick = g.selection_kl.idxmin()
        rows.append(
            {
                **{"model": m, "sparsity": s, "pipeline": pipe, "seed": seed, "chosen": pick},
                "reported": g.reported[pick],
                "minus_global": g.reported[pick] - g.reported["global"],
                "minus_oracle": g.reported[pick] - g.reported.max(),
                "oracle": g.reported.idxmax(),
            }
        )
    return pd.DataFrame(rows)


def table(df: pd.DataFrame, what: str) -> list[str]:
    lines = [f"| model | sparsity | pipeline | seeds | chosen | best-rule {what} | − global | − best in hindsight |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for (m, s, pipe), g in df.groupby(["model", "sparsity", "pipeline"], sort=True):
        names = ", ".join(f"{r} ×{list(g.chosen).count(r)}" for r in RULES if r in set(g.chosen))
        lines.append(
            f"| {m} | {s} | {pipe} | {len(g)} | {names} | {ci_text(g.reported.to_numpy(), 1, 1)} | "
            f"{ci_text(g.minus_global.to_numpy(), 1, 1, signed=True)} | "
            f"{ci_text(g.minus_oracle.to_numpy(), 1, 1, signed=True)} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / "rule_choice" / "rule_choice.md"))
    args = p.parse_args()
    cifar, edge = choices(cifar_cells()), choices(edge_cells())
    lines = [
        "# The rule chosen on the selection split (`--allocator best-rule`), from committed results",
        "",
        "Per cell the rule with the lowest selection KL (ties to global magnitude); its result is that rule's row.",
        "± is a 95% t interval over calibration seeds (none with one seed). No model was run for this table.",
        "",
        "## CIFAR-10 ResNets, `obs>bn>naive@block+logits`, test top-1 (%)",
        "",
        *table(cifar, "top-1 %"),
        "",
        f"Global magnitude chosen in {int((cifar.chosen == 'global').sum())} of {len(cifar)} cells; best-rule − "
        f"global over all cells: {ci_text(cifar.minus_global.to_numpy(), 1, 2, signed=True)} points.",
        "",
        "## EfficientNet-Lite1/Lite2, fidelity agreement with the dense model (%)",
        "",
        *table(edge, "agreement %"),
        "",
        f"Global magnitude chosen in {int((edge.chosen == 'global').sum())} of {len(edge)} cells; best-rule − "
        f"global over all cells: {ci_text(edge.minus_global.to_numpy(), 1, 2, signed=True)} points; the choice "
        f"matched the best rule in hindsight in {int((edge.minus_oracle == 0).sum())} of {len(edge)}.",
        "",
        "    python studies/rule_choice.py",
    ]
    write_report(Path(args.out), lines)


if __name__ == "__main__":
    run_main(main)
