"""Command line: ``python -m rr_alloc {search,verify,compare,apply,export,list}``.

Bad input ends with one ``error:`` line and exit code 2 (``UserError``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..errors import UserError
from ..runtime import tune_malloc
from . import apply_cmd, compare_cmd, search_cmd
from .flags import Parser

__all__ = ["main", "build_parser"]


def build_parser() -> Parser:
    p = Parser(
        prog="python -m rr_alloc",
        description="Per-layer sparsity allocation by Relative Repairability, verified with training-free repair.",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for family in (search_cmd, compare_cmd, apply_cmd):
        family.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        tune_malloc()  # a command-line run: large activations reuse heap memory (see runtime.py)
        return args.handler(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
