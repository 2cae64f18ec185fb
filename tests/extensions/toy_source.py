"""A new model source in one file: ``toy:NAME`` builds small CNNs for the embedded 8x8 digits."""

from torch import nn

from rr_alloc.data.transforms import TransformSpec
from rr_alloc.errors import UserError
from rr_alloc.models.sources import ModelSource, register_source

WIDTHS = {"narrow": 4, "wide": 16}


@register_source
class ToySource(ModelSource):
    prefix = "toy"
    usage = "toy:narrow|wide           small CNNs for the 8x8 digits"

    def build(self, name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
        if name not in WIDTHS or pretrained:
            raise UserError(f"unknown toy model {name!r}: use toy:narrow or toy:wide (random weights)")
        w = WIDTHS[name]
        return nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(w, num_classes or 10),
        )

    def transform(self, name: str, pretrained: bool, model: nn.Module | None) -> TransformSpec | None:
        return None  # the digits are arrays already
