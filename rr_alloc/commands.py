"""Further CLI commands (compare, apply, export), registered by ``cli.build_parser``."""

from __future__ import annotations

HANDLERS: dict = {}


def register(sub, add_run_flags) -> None:
    """Add this module's subcommands to the parser."""
