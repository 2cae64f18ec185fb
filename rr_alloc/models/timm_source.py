"""``--model timm:NAME``: models from timm (an optional extra), with timm's own input transform.

Weights are random unless ``--pretrained``, which downloads them through timm's usual path (the Hugging
Face hub) for users with a network; tests build timm models with random weights only.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..data.transforms import IMAGENET_TRANSFORM, TransformSpec
from ..errors import UserError
from .sources import ModelSource, register_source

__all__ = ["PREFIX", "TimmSource", "timm_model", "timm_transform"]

PREFIX = "timm:"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError(
            '--model timm:NAME needs timm, which is not installed: pip install -e ".[timm]" -c constraints.txt '
            "(or pip install timm)"
        ) from None
    return timm


def timm_model(spec: str, num_classes: int | None = None, pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` for ``timm:NAME`` (an unknown name is a one-line error)."""
    timm = _timm()
    name = spec[len(PREFIX) :]
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:3]
        hint = f" (e.g. {', '.join(close)})" if close else ""
        raise UserError(f"unknown timm model {name!r}{hint}: pass a name from timm.list_models()")
    kw = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(name, pretrained=pretrained, **kw)


def timm_transform(model: nn.Module) -> TransformSpec:
    """The evaluation transform of timm's data config for ``model``: resize, center crop, mean and std."""
    timm = _timm()
    cfg = timm.data.resolve_model_data_config(model)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    return TransformSpec(
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        resize=int(math.floor(size / crop_pct)),
        crop=size,
        interpolation=str(cfg.get("interpolation") or "bilinear"),
    )


@register_source
class TimmSource(ModelSource):
    """``timm:NAME``: timm's models with timm's own evaluation transform."""

    prefix = "timm"
    usage = "timm:NAME                any timm model (pip install timm; --pretrained downloads)"

    def build(self, name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
        return timm_model(PREFIX + name, num_classes, pretrained)

    def transform(self, name: str, pretrained: bool, model: nn.Module | None) -> TransformSpec | None:
        return timm_transform(model) if model is not None else IMAGENET_TRANSFORM
