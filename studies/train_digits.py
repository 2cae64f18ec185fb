"""Retrain the embedded digits model and write the weights that ship in the package.

The default run loads ``rr_alloc/models/digits_resnet.safetensors`` rather than training on first use,
because seeded training is not bit-for-bit the same on every CPU. This script is how that file was made:
it trains with ``train_digits_resnet`` (seed 0, 30 epochs on the digits training pool), reports test
top-1 (the 397 held-out digits, reporting only) and how far the new weights are from the shipped ones,
and writes the file (``--out``; default: the shipped file).

    python studies/train_digits.py                       # rewrite the shipped weights (~1 min here)
    python studies/train_digits.py --out /tmp/d.safetensors   # compare only

Output: studies/results/train_digits/train_digits.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import ROOT, machine, run_main
from safetensors.torch import load_file, save_file

from rr_alloc.data.splits import digits_arrays, digits_split_indices
from rr_alloc.models.digits import WEIGHTS, train_digits_resnet
from rr_alloc.system.files import atomic_path, write_text_atomic

OUT = ROOT / "studies" / "results" / "train_digits"


def test_top1(model: torch.nn.Module) -> float:
    x, y = digits_arrays()
    _, test_idx = digits_split_indices(len(x))
    with torch.no_grad():
        return float((model(x[test_idx]).argmax(1) == y[test_idx]).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=WEIGHTS, help="safetensors file to write (default: the shipped one)")
    args = p.parse_args()
    shipped = load_file(WEIGHTS) if WEIGHTS.exists() else None
    t0 = time.perf_counter()
    model = train_digits_resnet()
    seconds = time.perf_counter() - t0
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    diff = max(float((state[k].double() - shipped[k].double()).abs().max()) for k in state) if shipped else float("nan")
    with atomic_path(args.out) as tmp:
        save_file(state, str(tmp))
    lines = [
        "# The embedded digits model's weights",
        "",
        f"`python studies/train_digits.py{'' if args.out == WEIGHTS else ' --out ' + str(args.out)}` on {machine()}.",
        "",
        f"- trained in {seconds:.0f} s; test top-1 {100 * test_top1(model.eval()):.2f}% on the 397 held-out digits",
        f"- largest difference from the weights shipped before this run: {diff:.3g}",
        f"- written to `{args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}`",
    ]
    write_text_atomic(OUT / "train_digits.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run_main(main))
