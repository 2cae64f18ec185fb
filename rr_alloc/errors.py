"""User-facing errors: one line that names what is wrong and how to fix it."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The CLI prints ``error: <message>`` and exits with 2.

    Messages are a single line that names the problem and the fix, e.g.
    ``"--budget must lie in (0, 1), got 1.5: pass a fraction such as 0.9"``.
    """
