"""What the defaults cost on the embedded default: ``search --budget 0.9`` end to end (a fresh process each
time, profile cache off) as installed (allocator ``best-rule``: every rule repaired and scored; repair
``obs>bn>naive@block+logits``), with ``--allocator global`` (one rule, the same repair), and with global
magnitude under the channel-wise ``bn>naive@block+logits``; alternated, medians and their ratios measured in
one run.

    python studies/bench_default.py --repeats 3

Writes studies/results/bench_default/summary.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, machine

from rr_alloc.system.files import write_text_atomic

ARMS = {
    "default (best-rule, obs>bn>naive@block+logits)": [],
    "--allocator global (obs>bn>naive@block+logits)": ["--allocator", "global"],
    "--allocator global --repair bn>naive@block+logits": ["--allocator", "global", "--repair", "bn>naive@block+logits"],
}
BASE = "--allocator global --repair bn>naive@block+logits"


def run_once(flags: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "rr_alloc", "search", "--budget", "0.9", "--out", f"{tmp}/plan.json"]
        argv += ["--no-cache", *flags]
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    times: dict[str, list[float]] = {k: [] for k in ARMS}
    for _ in range(args.repeats):
        for name, flags in ARMS.items():
            times[name].append(run_once(flags))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[BASE]
    lines = [
        "# The embedded default, end to end, by allocator and repair",
        "",
        f"machine: {machine()}; `search --budget 0.9 --no-cache`, a fresh process each run, {args.repeats} runs each,",
        "alternated; median seconds (all runs) and the ratio to global magnitude under the channel-wise pipeline",
        "",
        "| flags | median s | runs | ratio |",
        "|---|---|---|---|",
    ]
    for k, v in times.items():
        lines.append(f"| {k} | {med[k]:.1f} | {', '.join(f'{t:.1f}' for t in v)} | {med[k] / base:.2f} |")
    lines += ["", "    python studies/bench_default.py --repeats 3"]
    out = ROOT / "studies" / "results" / "bench_default"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
