"""Datasets, seeded disjoint splits, and pre-decoded batches.

Every pass in rr_alloc (profiling, repair, evaluation) reads the same small
splits many times, so splits are decoded once into tensors and batched from
memory. Calibration and selection are disjoint, seeded subsets of *training*
images; test data is for reporting only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..system.files import removing_new_folders
from .images import UNLABELLED, UnlabeledFolder, align_classes, image_folder
from .transforms import TransformSpec

__all__ = [
    "DataSpec",
    "Batches",
    "Splits",
    "load_splits",
    "DATASET_KINDS",
    "digits_arrays",
    "digits_split_indices",
    "DIGITS_MEAN",
    "DIGITS_STD",
]

DATASET_KINDS = ("digits", "imagefolder", "cifar10", "cifar100", "mnist", "fashionmnist")
# Test subsets are drawn with a fixed seed, independent of the calibration seed,
# so every run and seed is scored on the same images.
_EVAL_SEED = 12345

# scikit-learn's bundled 8x8 digits (the embedded default's data; no download)
DIGITS_MEAN = 0.3
DIGITS_STD = 0.37
# Held-out digits for reporting only: the rest is the training pool that the
# model is fit on and from which calibration and selection splits are drawn.
DIGITS_TEST_SIZE = 397
DIGITS_SPLIT_SEED = 0


def digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as normalised ``(N, 1, 8, 8)`` float tensors and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = (x - DIGITS_MEAN) / DIGITS_STD
    return x, torch.from_numpy(d.target.astype(np.int64))


def digits_split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train pool, test) index split of the digits."""
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
    return np.sort(perm[DIGITS_TEST_SIZE:]), np.sort(perm[:DIGITS_TEST_SIZE])


@dataclass(frozen=True)
class DataSpec:
    """Where the images come from and how to split them.

    ``kind``: one of ``DATASET_KINDS``; ``train``/``test``: directory (ImageFolder)
    or torchvision root; ``transform``: evaluation transform; sizes in images.
    """

    kind: str = "digits"
    train: str | None = None
    test: str | None = None
    transform: TransformSpec | None = None
    calib_size: int = 1024
    selection_size: int = 1024
    validation_size: int = 0
    distill_size: int = 0  # images the kd step fits on: calibration plus this many minus it (0: calibration)
    eval_size: int | None = None  # None: the whole test set
    seed: int = 0
    download: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "distill_size" or self.distill_size}
        d["transform"] = self.transform.to_dict() if self.transform else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataSpec":
        d = dict(d)
        if d.get("transform") is not None:
            d["transform"] = TransformSpec.from_dict(d["transform"])
        return cls(**d)


class Batches:
    """Re-iterable mini-batches over in-memory tensors ``x`` (images) and ``y`` (labels)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> None:
        if len(x) != len(y):
            raise ValueError("x and y differ in length")
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    @property
    def n(self) -> int:
        return len(self.x)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.x), self.batch_size):
            yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]


@dataclass
class Splits:
    """Calibration, selection and validation (all from training images, disjoint) and test (reporting only).

    Validation images are drawn after the selection images from the same permutation, so adding them
    leaves calibration and selection as they were.
    """

    calib: Batches
    selection: Batches
    test: Batches
    calib_indices: list[int] = field(default_factory=list)
    selection_indices: list[int] = field(default_factory=list)
    test_indices: list[int] = field(default_factory=list)
    description: str = ""
    validation: Batches | None = None
    validation_indices: list[int] = field(default_factory=list)
    distill: Batches | None = None  # the kd step's images: calibration plus further ones (None: calibration)
    distill_indices: list[int] = field(default_factory=list)  # the further ones
    classes: int = 0  # classes the test labels index (0: unlabelled or not known)

    def unlabelled(self) -> "Splits":
        """The same images with every label -1 (labels that cannot be the model's classes are dropped)."""

        def drop(b: Batches | None) -> Batches | None:
            return None if b is None else Batches(b.x, torch.full_like(b.y, UNLABELLED), b.batch_size)

        return replace(
            self,
            calib=drop(self.calib),
            selection=drop(self.selection),
            test=drop(self.test),
            validation=drop(self.validation),
            distill=drop(self.distill),
            classes=0,
        )

    @property
    def test_labelled(self) -> bool:
        """Whether the test images carry labels (a folder of plain images does not)."""
        return bool(len(self.test.y)) and bool((self.test.y >= 0).all())


def _require_dir(path: str | None, what: str, flag: str) -> Path:
    if not path:
        raise UserError(f"no {what} given: pass {flag} PATH (or set it in the config file)")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{what} {p} is not a directory: pass an existing directory to {flag}")
    return p


def _torchvision_sets(spec: DataSpec, tf) -> tuple[Any, Any]:
    import torchvision.datasets as D

    if spec.kind == "imagefolder":
        train_dir = _require_dir(spec.train, "training data directory", "--train-data")
        test_dir = _require_dir(spec.test, "test data directory", "--test-data")
        train = image_folder(train_dir, tf, "--train-data")
        test = image_folder(test_dir, tf, "--test-data")
        align_classes(train, test, test_dir)
        return train, test
    cls = {"cifar10": D.CIFAR10, "cifar100": D.CIFAR100, "mnist": D.MNIST, "fashionmnist": D.FashionMNIST}[spec.kind]
    root = spec.train or spec.test
    if not root:
        raise UserError(
            f"no dataset root for {spec.kind}: pass --train-data ROOT "
            "(the torchvision root folder; add download: true in the config to fetch it)"
        )
    root_p = Path(root).expanduser()
    if not spec.download and not root_p.is_dir():
        raise UserError(
            f"dataset root {root_p} is not a directory: pass an existing torchvision root "
            "to --train-data, or set download: true in the config"
        )
    try:
        with removing_new_folders(root_p):
            tr = cls(str(root_p), train=True, transform=tf, download=spec.download)
            te = cls(
                str(Path(spec.test).expanduser() if spec.test else root_p),
                train=False,
                transform=tf,
                download=spec.download,
            )
    except RuntimeError as e:
        raise UserError(
            f"cannot read {spec.kind} under {root_p} ({str(e).splitlines()[0]}): "
            "pass the folder that holds the dataset, or set download: true"
        )
    return tr, te


def _item(ds, i: int, flag: str) -> tuple[Any, Any]:
    """``ds[i]``; an image that cannot be decoded is a one-line error naming the file."""
    try:
        return ds[i]
    except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError, truncated data, bad chunks
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot decode {_where(ds, i)} ({type(e).__name__}: {why}): the file is corrupt or truncated; "
            f"remove or replace it in the {flag} folder"
        ) from None
    except Exception as e:
        from PIL import Image

        if not isinstance(e, (RuntimeError, Image.DecompressionBombError)):
            raise
        if isinstance(e, Image.DecompressionBombError):
            raise UserError(
                f"{_where(ds, i)} is too large to decode safely ({str(e).splitlines()[0][:120]}): shrink it or "
                "remove it from the image folder"
            ) from None
        # the transform does not fit the image (Normalize's mean/std vs channels)
        raise UserError(
            f"the transform does not fit {_where(ds, i)} ({str(e).splitlines()[0]}): make the config's "
            "transform mean/std as long as the image's channels (3, or 1 with grayscale: true)"
        ) from None


def _where(ds: Any, i: int) -> str:
    samples = getattr(ds, "samples", None)
    return f"image {samples[i][0]}" if samples else f"image {i} of {type(ds).__name__}"


def _materialise(ds, indices: np.ndarray, desc: str, flag: str = "--train-data") -> tuple[torch.Tensor, torch.Tensor]:
    from ..system.progress import bar

    xs, ys = [], []
    for i in bar(indices.tolist(), desc=f"decoding {desc}", disable=len(indices) < 2000):
        x, y = _item(ds, i, flag)
        if xs and x.shape != xs[0].shape:  # checked as decoded: batches need one size
            raise UserError(
                f"{_where(ds, i)} decodes to {tuple(x.shape)} but {_where(ds, indices[0])} to "
                f"{tuple(xs[0].shape)}: give every image one size, or add resize and crop to the config's "
                "transform (e.g. transform: {resize: 32, crop: 32, mean: [...], std: [...]})"
            )
        xs.append(x)
        ys.append(int(y))
    if not xs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _draw(
    n_pool: int, calib: int, selection: int, seed: int, what: str, validation: int = 0, distill: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint calibration, selection, validation and extra distillation indices: consecutive slices of one
    seeded permutation (so a larger ``distill`` leaves the other three as they were)."""
    if calib < 1 or selection < 0 or validation < 0:
        raise UserError(
            f"calibration size must be >= 1, selection and validation sizes >= 0, got {calib}/{selection}/{validation}"
        )
    if distill and distill < calib:
        raise UserError(
            f"--distill-size {distill} is below the {calib} calibration images it includes: pass 0 (the "
            f"calibration split alone) or at least --calib-size"
        )
    extra = max(0, distill - calib)
    if calib + selection + validation + extra > n_pool:
        raise UserError(
            f"calibration ({calib}) + selection ({selection}) + validation ({validation}) + further distillation "
            f"({extra}) images exceed the {n_pool} training images of {what}: lower --calib-size/--selection-size/"
            "--validation-size/--distill-size"
        )
    perm = np.random.default_rng(seed).permutation(n_pool)
    end = calib + selection
    val_end = end + validation
    return (
        np.sort(perm[:calib]),
        np.sort(perm[calib:end]),
        np.sort(perm[end:val_end]),
        np.sort(perm[val_end : val_end + extra]),
    )


def _eval_indices(n: int, eval_size: int | None) -> np.ndarray:
    if eval_size is not None and eval_size > n:  # the plan records what was asked: it must be what ran
        raise UserError(f"--eval-size {eval_size} exceeds the {n} test images: pass at most {n}, or leave it out")
    if eval_size is None or eval_size == n:
        return np.arange(n)
    if eval_size < 1:
        raise UserError(f"--eval-size must be >= 1, got {eval_size}")
    return np.sort(np.random.default_rng(_EVAL_SEED).permutation(n)[:eval_size])


def _check_memory(spec: DataSpec, n_test: int) -> None:
    """Decoded splits live in memory: a transform whose images would not fit is refused before decoding."""
    side = (spec.transform.crop or spec.transform.resize) if spec.transform else None
    if not side:
        return
    from ..system.runtime import available_memory_bytes

    n = spec.calib_size + spec.selection_size + spec.validation_size + max(0, spec.distill_size - spec.calib_size)
    n += spec.eval_size or n_test
    need = n * (1 if spec.transform.grayscale else 3) * side * side * 4
    free = available_memory_bytes("cpu")
    if free and need > 0.8 * free:
        raise UserError(
            f"{n} images of {side}x{side} px take {need / 2**30:.1f} GiB decoded, more than the memory free "
            f"({free / 2**30:.1f} GiB): lower the transform's crop/resize, --calib-size, --selection-size or "
            "--eval-size"
        )


def load_splits(spec: DataSpec, batch_size: int = 256) -> Splits:
    """Decode the calibration, selection and test splits described by ``spec``."""
    if spec.kind not in DATASET_KINDS:
        raise UserError(f"unknown dataset {spec.kind!r}: use one of {', '.join(DATASET_KINDS)}")
    if spec.kind == "digits":
        return _digits_splits(spec, batch_size)
    tf = (spec.transform or TransformSpec()).build()
    train_ds, test_ds = _torchvision_sets(spec, tf)
    _check_memory(spec, len(test_ds))
    c, s, v, d = _draw(
        len(train_ds),
        spec.calib_size,
        spec.selection_size,
        spec.seed,
        spec.train or spec.kind,
        spec.validation_size,
        spec.distill_size,
    )
    t = _eval_indices(len(test_ds), spec.eval_size)
    cx, cy = _materialise(train_ds, c, "calibration")
    sx, sy = _materialise(train_ds, s, "selection")
    vx, vy = _materialise(train_ds, v, "validation")
    dx, dy = _materialise(train_ds, d, "distillation")
    tx, ty = _materialise(test_ds, t, "test", "--test-data")
    if len(tx) and len(cx) and tx.shape[1:] != cx.shape[1:]:
        raise UserError(
            f"test images decode to {tuple(tx.shape[1:])} but training images to {tuple(cx.shape[1:])}: give both "
            "folders one image size, or add resize and crop to the config's transform"
        )
    return Splits(
        Batches(cx, cy, batch_size),
        Batches(sx, sy, batch_size),
        Batches(tx, ty, batch_size),
        c.tolist(),
        s.tolist(),
        t.tolist(),
        f"{spec.kind}: {len(train_ds)} train{_unlabelled(train_ds)} / {len(test_ds)} test{_unlabelled(test_ds)}",
        Batches(vx, vy, batch_size),
        v.tolist(),
        Batches(torch.cat([cx, dx]), torch.cat([cy, dy]), batch_size) if len(d) else None,
        d.tolist(),
        len(getattr(train_ds, "classes", None) or getattr(test_ds, "classes", None) or []),
    )


def _unlabelled(ds: Any) -> str:
    return " (unlabelled)" if isinstance(ds, UnlabeledFolder) else ""


def _digits_splits(spec: DataSpec, batch_size: int) -> Splits:
    """The splits of the built-in digits (8x8 arrays: nothing to decode)."""
    x, y = digits_arrays()
    pool, test = digits_split_indices(len(x))
    c, s, v, d = _draw(
        len(pool),
        spec.calib_size,
        spec.selection_size,
        spec.seed,
        "the digits training pool",
        spec.validation_size,
        spec.distill_size,
    )
    ci, si, vi, di = pool[c], pool[s], pool[v], pool[d]
    ti = test[_eval_indices(len(test), spec.eval_size)]
    distill = Batches(x[np.concatenate([ci, di])], y[np.concatenate([ci, di])], batch_size) if len(di) else None
    return Splits(
        Batches(x[ci], y[ci], batch_size),
        Batches(x[si], y[si], batch_size),
        Batches(x[ti], y[ti], batch_size),
        ci.tolist(),
        si.tolist(),
        ti.tolist(),
        f"sklearn digits: {len(pool)} train pool / {len(test)} test",
        Batches(x[vi], y[vi], batch_size),
        vi.tolist(),
        distill,
        di.tolist(),
    )
