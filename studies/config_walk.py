"""The walk of the search command's config through the package: which modules a run passes through.

Runs ``search`` in-process on the embedded digits default (a short search, the channel-wise repair) under
``sys.setprofile`` and records every call from one ``rr_alloc`` module into another. Reports, for modules and for
*rooms* (the package root's subpackages and modules), how many are entered, the distinct transitions between
them, and the *climbs back up* (a call from one into another that imports it, directly or not: control running
against the import graph, as a callback, a registry's dispatch or a facade reading back from its parts does).
Run it on two checkouts to compare their architecture:

    python studies/config_walk.py                               # this checkout
    PYTHONPATH=/path/to/other/checkout python studies/config_walk.py --tag other
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def walk(argv: list[str]) -> list[tuple[str, str]]:
    """Module-to-module call transitions of ``rr_alloc`` code while ``main(argv)`` runs."""
    from rr_alloc.cli import main

    edges: list[tuple[str, str]] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if callee.startswith("rr_alloc") and caller.startswith("rr_alloc") and callee != caller:
            edges.append((caller, callee))

    sys.setprofile(profile)
    try:
        code = main(argv)
    finally:
        sys.setprofile(None)
    assert code == 0, code
    return edges


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", default="this")
    args = p.parse_args()
    import grimp

    import rr_alloc

    graph = grimp.build_graph("rr_alloc", exclude_type_checking_imports=True)  # what runs, not annotations
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["search", "--budget", "0.9", "--allocator", "optuna", "--n-trials", "2", "--no-verify"]
        argv += ["--repair", "bn>naive@block+logits", "--calib-size", "64", "--selection-size", "32"]
        argv += ["--storage", f"sqlite:///{tmp}/o.db", "--out", f"{tmp}/plan.json", "--cache-dir", tmp]
        edges = walk(argv)
    modules = graph.modules
    distinct = sorted({(a, b) for a, b in edges if a in modules and b in modules})
    climbs = sorted({(a, b) for a, b in distinct if graph.chain_exists(importer=b, imported=a)})

    # the same walk between rooms of the package root: its subpackages and top-level modules
    def room(m: str) -> str:
        return ".".join(m.split(".")[:2])

    rooms = sorted({(room(a), room(b)) for a, b in distinct if room(a) != room(b)})
    room_climbs = sorted(
        (a, b)
        for a, b in rooms
        if b != "rr_alloc" and graph.find_shortest_chains(importer=b, imported=a, as_packages=True)
    )
    out = {
        "checkout": str(Path(rr_alloc.__file__).resolve().parents[1]),
        "modules": len({m for e in distinct for m in e}),
        "module_transitions": len(distinct),
        "module_climbs_back_up": len(climbs),
        "rooms": len({r for e in rooms for r in e}),
        "room_transitions": len(rooms),
        "room_climbs_back_up": len(room_climbs),
        "room_climbs": [f"{a} -> {b}" for a, b in room_climbs],
        "module_climbs": [f"{a} -> {b}" for a, b in climbs],
    }
    folder = ROOT / "studies" / "results" / "config_walk"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{args.tag}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
