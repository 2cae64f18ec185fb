"""Declaring an option once: ``option`` builds a dataclass field whose metadata carries the value check, the
help text, the flag group and the study-key role; the checks return the problem with a value or ``None``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import field
from typing import Any

__all__ = ["Check", "option", "GROUPS", "whole", "real", "text", "boolean", "texts", "fractions", "mapping"]

Check = Callable[[Any], "str | None"]  # the problem with a value, or None


def whole(lo: int, hi: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
        return None if ok else (f"a whole number >= {lo}" if hi is None else f"a whole number from {lo} to {hi}")

    return check


def real(lo: float, hi: float | None = None, open_lo: bool = True) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if open_lo else v >= lo) and (hi is None or v < hi)
        rng = f"in ({lo}, {hi})" if hi is not None else (f"> {lo}" if open_lo else f">= {lo}")
        return None if ok else f"a finite number {rng}"

    return check


def text(v: Any) -> str | None:
    return None if isinstance(v, str) and v and v.isprintable() else "a non-empty single-line string"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def texts(v: Any) -> str | None:
    return None if isinstance(v, (tuple, list)) and all(text(x) is None for x in v) else "a list of strings"


def fractions(v: Any) -> str | None:
    ok = isinstance(v, (tuple, list)) and len(v) > 0 and all(real(0.0, 1.0)(x) is None for x in v)
    return None if ok else "a list of finite sparsities in (0, 1), e.g. 0.5 0.9 0.99"


def mapping(v: Any) -> str | None:
    return None if isinstance(v, dict) else "a mapping (e.g. {mean: [...], std: [...]})"


# flag groups of the commands that build a run, in the order --help shows them
GROUPS = {
    "data": "model and data (override the config file)",
    "alloc": "profile and allocation",
    "repair": "repair",
    "search": "optuna allocator",
}


def option(
    default: Any,
    check: Check,
    help: str | None = None,
    group: str | None = None,
    *,
    choices: tuple[str, ...] | None = None,
    kind: type = str,
    many: bool = False,
    flag: str | None = None,
    study_key: str | None = None,
) -> Any:
    """A ``RunConfig`` field declared once: its default, value ``check`` (None is allowed when the default is
    None), and, for options with a flag, ``help`` and ``group`` (``GROUPS``), ``choices``, the value ``kind``
    (``int``, ``float``, ``str``, ``bool``), ``many`` (a list), ``flag`` (another flag name, e.g. ``--no-cache``
    for a switch that turns the option off). ``study_key``: ``always`` or ``evo`` when the option changes what
    a search trial's score means (it then keys the study).
    """
    meta = {
        "check": check,
        "help": help,
        "group": group,
        "choices": choices,
        "kind": kind,
        "many": many,
        "flag": flag,
        "study_key": study_key,
    }
    return field(default=default, metadata=meta)
