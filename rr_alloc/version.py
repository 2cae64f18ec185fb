"""The package version (one place; plans record it)."""

__version__ = "0.2.0"
