"""Atomic file writes (a half-written plan or table never replaces a good one) and the one output-path check."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import UserError


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


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """A temporary folder inside ``folder`` to write a run's files into; they are moved into ``folder``
    together only when the block succeeds (the file named ``last``, e.g. the plan, after the others), so a
    failure while they are written leaves an earlier run's files as they were.

    Each moved file gets the mode a plain ``open()`` of its final path would leave, as ``atomic_path`` does.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staged.", dir=folder))
    try:
        yield staging
        for f in sorted(staging.iterdir(), key=lambda f: (f.name == last, f.name)):
            os.chmod(f, _target_mode(folder / f.name))
            os.replace(f, folder / f.name)
    finally:
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()


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


def _kind(p: Path) -> str | None:
    """What a non-regular existing path is (``None`` for a regular file, a folder or nothing)."""
    mode = os.stat(p).st_mode
    for test, name in (
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "named pipe"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return None


def check_output(
    path: str | os.PathLike,
    flag: str,
    is_dir: bool = False,
    inputs: Sequence[str | os.PathLike | None] = (),
    siblings: Sequence[str | os.PathLike] = (),
    input_folders: Sequence[str | os.PathLike | None] = (),
) -> Path:
    """The one check of an output path, before any work: writable, not a symbolic link or a device, not one
    of the run's ``inputs`` (a plan, a checkpoint) and not one of the other files the run writes
    (``siblings``). Creates nothing."""
    p = Path(path)
    if p.is_symlink():
        raise UserError(f"{flag} {p} is a symbolic link: pass the path of a real file (a link is never replaced)")
    if p.exists() and _kind(p):
        what = "a folder" if is_dir else "a regular file"
        raise UserError(f"{flag} {p} is a {_kind(p)}, not {what}: pass the path of {what}")
    for other in inputs:
        if other is not None and _same(p, Path(other)):
            raise UserError(f"{flag} {p} is the input {other}: pass another output path (the input stays as it is)")
    for folder in input_folders:  # an image folder must not collect a plan (nor lose an image to it)
        if folder is not None and Path(folder).is_dir() and any(inside(p, r) for r in linked_roots(Path(folder))):
            raise UserError(f"{flag} {p} lies inside the input folder {folder}: write outputs elsewhere")
    for other in siblings:
        if _same(p, Path(other)):
            raise UserError(f"{flag} {p} is also where this run writes another file: pass another name")
        for inp in inputs:
            if inp is not None and _same(Path(other), Path(inp)):
                raise UserError(f"{other}, which this run writes beside {flag}, is the input {inp}: pass another --out")
        q = Path(other)
        if q.is_symlink() or q.is_dir() or (q.exists() and _kind(q)):
            raise UserError(f"{q}, which this run writes beside {flag}, is not a regular file: move it away")
    return check_writable(p, flag, is_dir)


@contextlib.contextmanager
def removing_new_folders(path: str | os.PathLike) -> Iterator[None]:
    """Folders of ``path`` that do not exist yet are removed again, if still empty, when the body fails
    (a download that could not reach its server leaves no empty folder behind)."""
    new = [p for p in (Path(path), *Path(path).parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for d in new:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def check_input_file(path: str | os.PathLike, what: str, flag: str, want: str) -> Path:
    """An input that must be a readable regular file: a missing path, a folder, a pipe or a device is a
    one-line error saying which it is (``want``: what to pass instead, e.g. "a plan written by search")."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {p} does not exist: pass {want} to {flag}")
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder: pass {want} to {flag}")
    kind = _kind(p)
    if kind:
        raise UserError(f"{what} {p} is a {kind}, not a file: pass {want} to {flag}")
    return p


def linked_roots(folder: Path, limit: int = 100_000) -> list[Path]:
    """``folder`` and every place a symbolic link inside it leads to (a linked image or class folder is as
    much an input as the folder itself); the walk follows no link."""
    roots = [folder]
    seen = 0
    for here, dirs, files in os.walk(folder, followlinks=False):
        for name in (*dirs, *files):
            seen += 1
            q = Path(here) / name
            if q.is_symlink():
                roots.append(q.resolve())
        if seen > limit:
            break
    return roots


def inside(p: Path, folder: Path) -> bool:
    """``p`` is ``folder`` or lies inside it (a linked file counts as the ``folder`` it resolves to)."""
    try:
        p.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


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
