"""The command line wing: flags, then one module per command family (``main`` is the entry point)."""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
