"""Image folders read so that a wrong image is named, never silently changed or skipped.

- ``decode``: opens only regular files (a FIFO named ``x.jpg`` would block forever) and converts every
  PIL mode to RGB by its meaning: 16-bit and 32-bit integer greyscale are scaled to 8 bits, not clipped
  to white as ``convert("RGB")`` does.
- ``image_folder``: an ImageFolder (one subfolder per class) that also reads GIFs and says which other files it
  left out; a folder of plain images (no class folders) is read unlabelled (``UnlabeledFolder``: label -1).
- ``align_classes``: test labels follow the training folder's class indices by class name, so a test
  folder missing a class does not shift every label after it.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

__all__ = ["decode", "image_folder", "align_classes", "UnlabeledFolder", "UNLABELLED", "EXTENSIONS"]

UNLABELLED = -1  # the label of every image of a folder without class folders

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def decode(path: str) -> Any:
    """The image at ``path`` as an 8-bit RGB PIL image."""
    from PIL import Image

    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"image {path} is a broken link (to {os.readlink(path)}): restore its target or remove it")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise UserError(f"image {path} is not a regular file (a pipe or device): remove it from the image folder")
    with Image.open(path) as img:
        img.load()
        return _to_rgb(img, path)


def _to_rgb(img: Any, path: str) -> Any:
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        grey = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode == "I" and a.max() > 255 else (255.0 if img.mode == "I" else 1.0)
        if not np.isfinite(a).all():
            raise UserError(f"image {path} has {img.mode} pixels that are not finite (NaN or inf): save it again")
        if a.min() < 0 or a.max() > top:
            raise UserError(
                f"image {path} has {img.mode} pixels in [{a.min():g}, {a.max():g}], outside 0..{top:g}: "
                "save it as an 8- or 16-bit image"
            )
        return Image.fromarray(np.round(a / top * 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def check_no_link_loop(root: Path, flag: str) -> None:
    """A folder link that leads back into the tree above it would be walked forever (or once per loop, counting
    the same images many times), and two paths to one folder would read its images twice, possibly into two
    splits: both refused, naming the link. Links are followed as the image reader follows them."""
    top = root.resolve()
    seen = {top}
    stack = [(root, top)]  # each folder with the real folder it leads to
    while stack:
        here, parent = stack.pop()
        try:
            subdirs = sorted(Path(e.path) for e in os.scandir(here) if e.is_dir())
        except OSError:
            continue  # unreadable here: the image reader names it
        for d in subdirs:
            target = d.resolve()
            if d.is_symlink():
                if target == top or top in target.parents or target == parent or target in parent.parents:
                    into = root if target == top or top in target.parents else f"{target}, a folder it lies in"
                    raise UserError(
                        f"{d} links back into {into} (a loop: its images would be read again and again): "
                        f"remove the link from the {flag} folder"
                    )
            if target in seen:
                raise UserError(
                    f"{d} reaches {target} a second time (a link loop, or two links to one folder: its images "
                    f"would be read twice): remove the link from the {flag} folder"
                )
            seen.add(target)
            stack.append((d, target))


class UnlabeledFolder:
    """The images directly in ``root`` (sorted by name), each with the label ``UNLABELLED``."""

    classes: list[str] = []

    def __init__(self, root: Path, files: list[str], transform: Any) -> None:
        self.root, self.transform = root, transform
        self.samples = [(str(root / f), UNLABELLED) for f in sorted(files)]
        self.targets = [UNLABELLED] * len(self.samples)
        self.class_to_idx: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        img = decode(path)
        return (self.transform(img) if self.transform is not None else img), label


def _layout(root: Path, flag: str) -> list[str]:
    """The loose image files directly in ``root`` (empty: class folders); a folder that mixes both, or holds
    fewer than two images, is refused."""
    loose, folders = [], False
    for entry in os.scandir(root):
        if entry.is_file() and entry.name.lower().endswith(EXTENSIONS):
            loose.append(entry.name)
        elif entry.is_dir() and not entry.name.startswith("."):
            folders = folders or any(f.lower().endswith(EXTENSIONS) for _, _, fs in os.walk(entry.path) for f in fs)
    if loose and folders:
        raise UserError(
            f"{flag} {root} mixes class folders with {len(loose)} loose image{'s' * (len(loose) > 1)}: pass a "
            "folder of class folders (labelled) or a folder of plain images (unlabelled), not both"
        )
    if len(loose) == 1:
        raise UserError(f"{flag} {root} holds one image: pass a folder with at least 2 images")
    return loose


def image_folder(root: Path, transform: Any, flag: str, note: Any = print) -> Any:
    """``torchvision.datasets.ImageFolder`` over ``root`` with ``decode``, or an ``UnlabeledFolder`` when the
    images lie directly in ``root``; files it leaves out are named."""
    import torchvision.datasets as D

    check_no_link_loop(root, flag)
    loose = _layout(root, flag)
    if loose:
        return UnlabeledFolder(root, loose, transform)
    left_out: Counter[str] = Counter()

    def valid(path: str) -> bool:
        ok = path.lower().endswith(EXTENSIONS)
        if not ok:
            left_out[Path(path).suffix.lower() or Path(path).name] += 1
        return ok

    try:
        ds = D.ImageFolder(str(root), transform=transform, loader=decode, is_valid_file=valid)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(
            f"cannot read ImageFolder data under {root} ({str(e).splitlines()[0]}): "
            f"point {flag} at a folder of images, or of one subfolder of images per class"
        ) from None
    if left_out:
        kinds = ", ".join(f"{n} {k}" for k, n in left_out.most_common(4))
        note(f"note: {flag} {root}: left out {sum(left_out.values())} files that are not images ({kinds})")
    return ds


def align_classes(train: Any, test: Any, test_root: Path) -> None:
    """Give ``test`` the training folder's class indices (by class name); unknown test classes are an error.
    An unlabelled folder on either side leaves the test labels as the test folder has them."""
    if test.classes == train.classes or not train.classes or not test.classes:
        return
    unknown = [c for c in test.classes if c not in train.class_to_idx]
    if unknown:
        raise UserError(
            f"test folder {test_root} has classes the training folder lacks ({', '.join(unknown[:3])}): "
            "pass test and training folders of the same classes"
        )
    index = [train.class_to_idx[c] for c in test.classes]
    test.samples = [(p, index[t]) for p, t in test.samples]
    test.imgs = test.samples
    test.targets = [t for _, t in test.samples]
    test.classes, test.class_to_idx = list(train.classes), dict(train.class_to_idx)
