"""The one output check of every command: the same inputs are protected whichever command writes."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..config.run_config import RunConfig
from ..errors import UserError
from ..plans.plan import Plan
from ..search.storage import storage_file
from ..system.files import check_output, inside, linked_roots

__all__ = ["check_command_output", "outputs_in_place", "finished", "reset"]

_done = False


def reset() -> None:
    """A new command begins: none of its outputs are in place."""
    global _done
    _done = False


def outputs_in_place() -> None:
    """The command's files are all written and moved into place: an interrupt now ends a finished run."""
    global _done
    _done = True


def finished() -> bool:
    return _done


def check_command_output(
    path: str | Path,
    flag: str,
    args: argparse.Namespace,
    cfg: RunConfig,
    plan: Plan | None = None,
    siblings: Sequence[str | Path] = (),
    is_dir: bool = False,
) -> Path:
    """``io_utils.check_output`` with every input of the run: the plan, the config file, the checkpoints (the
    run's and the plan's), the search storage, and the image folders (no output lands inside them)."""
    if not str(path).strip():  # Path("") is the working directory: never a place a user asked for
        raise UserError(f"{flag} is empty: pass the path to write to")
    if not is_dir and str(path).endswith(("/", "\\")):
        raise UserError(f"{flag} {path} names a folder (it ends with a slash): pass the path of a file")
    inputs = (
        getattr(args, "plan", None),
        getattr(args, "config", None),
        cfg.checkpoint,
        plan.source.get("checkpoint") if plan is not None else None,
        storage_file(cfg.storage) if cfg.storage else None,
    )
    folders = (cfg.train_data, cfg.test_data)
    # the other places a run writes: the search storage and the profile cache never go into an image folder
    for where, other in (
        ("--storage", storage_file(cfg.storage) if cfg.storage else None),
        ("--cache-dir", cfg.cache_dir),
    ):
        for folder in folders:
            if (
                other
                and folder
                and Path(folder).is_dir()
                and any(inside(Path(other), r) for r in linked_roots(Path(folder)))
            ):
                raise UserError(f"{where} {other} lies inside the input folder {folder}: keep it elsewhere")
    return check_output(path, flag, is_dir, inputs, siblings, input_folders=folders)
