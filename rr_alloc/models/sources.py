"""Model sources: each family of model names is one ``ModelSource`` registered under its prefix.

``parse_model_name`` is the one place a ``--model`` value is read (timm's ``parse_model_name`` shape):

- a zoo name (``digits_resnet``, ``cifar_resnet20`` ...) -> the zoo;
- ``PREFIX:NAME`` of a registered source (``torchvision:resnet18``, ``timm:efficientnet_b0``) -> that source;
- a bare name (``resnet18``) -> torchvision;
- anything else with a colon (``package.module:factory``) -> the user's code, which naming it asks to run.

A new family is one class with ``@register_source``: ``build`` and ``transform``; ``runs_code`` says whether
naming it imports and runs code (a plan naming such a model is replayed only with an explicit opt-in).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..data.transforms import TransformSpec

__all__ = ["ModelSource", "SOURCES", "register_source", "parse_model_name"]


class ModelSource:
    """A family of models: builds ``NAME`` (its name within the family) and gives its input transform."""

    prefix: ClassVar[str] = ""
    runs_code: ClassVar[bool] = False  # naming a model of this family imports and runs the user's code
    usage: ClassVar[str] = ""  # one line for `list`: how its names are written and what they are

    def build(self, name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
        raise NotImplementedError

    def transform(self, name: str, pretrained: bool, model: nn.Module | None) -> TransformSpec | None:
        """The model's own input transform (``None``: the data's own, e.g. arrays)."""
        return None


SOURCES: dict[str, ModelSource] = {}  # prefix -> source, in registration order


def register_source(cls: type[ModelSource]) -> type[ModelSource]:
    """Class decorator: names ``cls.prefix:NAME`` now build through ``cls``."""
    SOURCES[cls.prefix] = cls()
    return cls


def parse_model_name(name: str) -> tuple[ModelSource, str]:
    """``(source, name within it)`` of a ``--model`` value (see the module docstring)."""
    zoo = SOURCES.get("zoo")
    if zoo is not None and name in getattr(zoo, "names", {}):
        return zoo, name
    prefix, sep, rest = name.partition(":")
    if not sep:
        return SOURCES["torchvision"], name
    source = SOURCES.get(prefix)
    if source is not None and not source.runs_code:
        return source, rest
    return SOURCES["code"], name
