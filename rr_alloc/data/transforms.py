"""Input transforms as plain data, so plans can record and rebuild them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
MAX_SIDE = 1024  # pixels: larger images would not fit a calibration split in memory


@dataclass(frozen=True)
class TransformSpec:
    """Evaluation transform: optional resize and center crop, then normalise."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int | None = None
    crop: int | None = None
    grayscale: bool = False
    interpolation: str = "bilinear"  # of the resize: bilinear, bicubic or nearest (timm models name theirs)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown transform keys {sorted(unknown)}: use {sorted(known)}")
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                v = d[k]
                try:
                    d[k] = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else None
                except (TypeError, ValueError):
                    d[k] = None
                if not d[k] or not all(math.isfinite(x) and (k == "mean" or x >= 1e-6) for x in d[k]):
                    raise UserError(
                        f"transform {k} must be a list of finite numbers{'' if k == 'mean' else ' >= 1e-6'}, "
                        f"got {v!r}: e.g. {k}: [0.5, 0.5, 0.5]"
                    )
        for k in ("resize", "crop"):
            v = d.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SIDE):
                raise UserError(f"transform {k} must be a whole number of pixels in [1, {MAX_SIDE}], got {v!r}")
        if d.get("interpolation", "bilinear") not in _INTERPOLATIONS:
            raise UserError(
                f"transform interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {d['interpolation']!r}"
            )
        if not isinstance(d.get("grayscale", False), bool):
            raise UserError(f"transform grayscale must be true or false, got {d['grayscale']!r}")
        spec = cls(**d)
        channels = 1 if spec.grayscale else 3  # images are decoded to RGB, or to one channel with grayscale
        if len(spec.mean) != len(spec.std) or len(spec.mean) not in (1, channels):
            raise UserError(
                f"transform mean ({len(spec.mean)} values) and std ({len(spec.std)}) must each have {channels} "
                f"values (or 1) for {'grayscale' if spec.grayscale else 'RGB'} images: fix the config's transform"
            )
        return spec

    def build(self):
        """A torchvision transform for PIL images."""
        from torchvision import transforms as T

        ops: list = []
        if self.grayscale:
            ops.append(T.Grayscale(1))
        if self.resize:
            ops.append(T.Resize(self.resize, interpolation=T.InterpolationMode(self.interpolation)))
        if self.crop:
            ops.append(T.CenterCrop(self.crop))
        ops += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(ops)


IMAGENET_TRANSFORM = TransformSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=256, crop=224)  # resize, centre crop
