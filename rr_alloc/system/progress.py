"""Progress bars (tqdm) that leave the next line clean.

A bar redraws its line with carriage returns and, closed with ``leave=False``, blanks it without a
newline: in a log file the next message would then start mid-line. ``bar`` records that a bar was drawn,
and ``end_line`` (called before the command line prints ``error: ...``) starts a fresh line, so every
error line in a log begins with ``error:``.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["bar", "end_line", "start"]

_drawn = False


def bar(iterable: Any = None, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(iterable, leave=False, **kwargs)`` on standard error."""
    global _drawn
    from tqdm.auto import tqdm

    kwargs.setdefault("leave", False)
    if not kwargs.get("disable", False):
        _drawn = True
    return tqdm(iterable, file=sys.stderr, **kwargs)


def start() -> None:
    """A new command begins: no bar of its own has been drawn yet."""
    global _drawn
    _drawn = False


def end_line() -> None:
    """Start a new line on standard error if a progress bar may have left the cursor mid-line."""
    global _drawn
    if _drawn:
        sys.stderr.write("\n")
        _drawn = False
