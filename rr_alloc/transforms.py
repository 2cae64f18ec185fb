"""Input transforms as plain data, so plans can record and rebuild them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TransformSpec:
    """Evaluation transform: optional resize and center crop, then normalise."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int | None = None
    crop: int | None = None
    grayscale: bool = False

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
            if k in d and d[k] is not None:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def build(self):
        """A torchvision transform for PIL images."""
        from torchvision import transforms as T

        ops: list = []
        if self.grayscale:
            ops.append(T.Grayscale(1))
        if self.resize:
            ops.append(T.Resize(self.resize))
        if self.crop:
            ops.append(T.CenterCrop(self.crop))
        ops += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(ops)
