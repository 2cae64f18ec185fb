"""User-facing errors: one line that names what is wrong and how to fix it."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The CLI prints ``error: <message>`` and exits with 2.

    Messages are a single line that names the problem and the fix, e.g.
    ``"--budget must lie in (0, 1), got 1.5: pass a fraction such as 0.9"``.
    """


def system_error_line(e: BaseException) -> str:
    """The one-line message of an error from the system rather than from rr_alloc's checks: a failed download,
    a file that cannot be read or written, a number too large, a model too deeply nested."""
    import urllib.error

    if isinstance(e, urllib.error.URLError):
        return (
            f"cannot download ({getattr(e, 'reason', e)}): this machine cannot reach the hub; pass local files "
            "instead (--checkpoint FILE for weights, --train-data DIR for data)"
        )
    if isinstance(e, OSError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return f"{e.strerror or e}{where}: check the path, its permissions and the free disk space"
    if isinstance(e, OverflowError):
        return f"a number is too large ({e}): check the flags, the config file and the plan for huge values"
    if isinstance(e, RecursionError):
        return "the model is nested too deeply to trace or copy (Python's recursion limit): flatten its modules"
    return f"{type(e).__name__}: {e}"
