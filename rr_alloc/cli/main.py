"""Command line: ``python -m rr_alloc {search,verify,compare,apply,export,list}``.

Bad input ends with one ``error:`` line and exit code 2 (``UserError``), and so do the errors of the system
that a user can fix (a failed download, an unreadable or unwritable file, a number too large): this is the
one place they become that line (``errors.system_error_line``). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from ..errors import UserError, system_error_line
from ..system.progress import end_line
from ..system.progress import start as progress_start
from ..system.runtime import tune_malloc
from . import apply_cmd, compare_cmd, search_cmd
from .flags import Parser
from .outputs import finished
from .outputs import reset as out_reset

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that every ``finally`` (staged files, storages) runs."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


class _ClosedPipeSafe(io.TextIOBase):
    """Standard output that goes quiet once its reader is gone (``| head``): the run still writes its files."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.closed_pipe = stream, False

    def write(self, text: str) -> int:
        if not self.closed_pipe:
            try:
                self.stream.write(text)
            except OSError:  # a closed pipe, or a full device (> /dev/full): the files matter more
                self._close()
        return len(text)

    def flush(self) -> None:
        if not self.closed_pipe:
            try:
                self.stream.flush()
            except OSError:
                self._close()

    def _close(self) -> None:
        self.closed_pipe = True
        with contextlib.suppress(OSError):  # python's exit flush must not fail on the dead pipe again
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    out_reset()
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    stdout = sys.stdout
    if argv is None:  # the command line itself (tests pass argv and keep their captured streams)
        # a closed standard output (>&-) leaves sys.stdout None: the run still writes its files
        sys.stdout = _ClosedPipeSafe(stdout if stdout is not None else open(os.devnull, "w"))  # noqa: SIM115
    try:
        return _main(argv)
    finally:
        sys.stdout = stdout
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _main(argv: Sequence[str] | None) -> int:
    try:
        progress_start()
        argv = list(sys.argv[1:] if argv is None else argv)
        twice = repeated_flag(argv)
        if twice:  # argparse would keep the last value silently
            raise UserError(
                f"{twice} is given twice: keep one (a flag of several values takes them all after one --flag)"
            )
        args = build_parser().parse_args(argv)
        tune_malloc()  # a command-line run: large activations reuse heap memory (see runtime.py)
        return args.handler(args)
    except UserError as e:
        return _fail(str(e), 2)
    except KeyboardInterrupt as e:
        if _main_thread():  # a second Ctrl-C while the process winds down must not become a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if finished():  # the signal came after every output was in place: the run is complete
            print("note: interrupted after the outputs were written; they are complete", file=sys.stderr)
            return 0
        return _fail(
            "terminated" if isinstance(e, Terminated) else "interrupted", 143 if isinstance(e, Terminated) else 130
        )
    except BrokenPipeError:  # the reader went away (| head): nothing left to tell it
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - python's exit flush must not fail again
        return 141
    except (OSError, OverflowError, RecursionError) as e:
        return _fail(system_error_line(e), 2)


def repeated_flag(argv: Sequence[str]) -> str | None:
    """The first long flag given twice on the command line, or ``None``."""
    seen: set[str] = set()
    for token in argv:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if token.startswith("--") and name in seen:
            return name
        seen.add(name)
    return None


def _fail(message: str, code: int) -> int:
    end_line()  # after a progress bar, the error starts its own line
    print(f"error: {message}", file=sys.stderr)
    return code
