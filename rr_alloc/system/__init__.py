"""Process and file plumbing: atomic and staged writes, progress bars, process-level settings."""
