"""Atomic file writes: a half-written plan or table never replaces a good one."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


def _current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _target_mode(path: Path) -> int:
    """Mode the finished file gets: an existing file's own, else ``0666 & ~umask`` as open() would give."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only on success.

    mkstemp creates the temporary file 0600; before the rename it gets the mode
    a plain ``open(path, "w")`` would leave (an overwritten file keeps its mode,
    a new one gets ``0666 & ~umask``), so atomic writes do not change permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _target_mode(path))
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_writable(path: str | os.PathLike, flag: str, is_dir: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written; create nothing.

    Walks up to the first existing ancestor, which must be a folder, and probes it with a
    temporary file (or folder, when folders are still to be made) that is removed at once:
    ``os.access`` alone says yes to root everywhere, also on ``/proc`` or a read-only mount.
    ``is_dir``: ``path`` is an output folder rather than a file.
    """
    p = Path(path)
    if not is_dir and p.is_dir():
        raise UserError(f"{flag} {p} is an existing folder: pass a file path (e.g. {p / 'out'})")
    if is_dir and p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is an existing file: pass a folder")
    target = p if is_dir else p.parent
    anc = target
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{flag} {p} lies under {anc}, which is not a folder: pass a path in a folder")
    try:
        if not os.access(anc, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
        if anc == target:
            fd, probe = tempfile.mkstemp(prefix=".rr_alloc_probe.", dir=anc)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".rr_alloc_probe.", dir=anc))
    except OSError as e:
        raise UserError(f"{flag} {p} cannot be written ({anc}: {e.strerror or e}): pass a writable location")
    return p
