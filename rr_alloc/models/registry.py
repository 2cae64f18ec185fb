"""The built-in model sources (the zoo, torchvision, the user's code; timm in ``timm_source``) and the two
calls every caller makes: ``build_model`` and ``default_transform``.

A model is named by
- a zoo name (``digits_resnet``, ``cifar_resnet20`` ... ``cifar_resnet110``),
- a torchvision classification model (``resnet18`` or ``torchvision:resnet18``),
- ``timm:NAME``,
- or the user's own ``package.module:factory`` (importing it runs the user's code,
  which is exactly what naming it asks for).

Weights a model draws at random (no checkpoint, no ``--pretrained``) come from a fixed seed
(``INIT_SEED``), so the same name gives the same model in every run, and ``verify``/``apply`` rebuild
the model a plan was made on; the caller's random state is left as it was.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, IMAGENET_TRANSFORM, TransformSpec
from ..errors import UserError
from ..system.files import removing_new_folders
from .cifar_resnet import CIFAR_DEPTHS, cifar_resnet
from .digits import DigitsResNet, pretrained_digits_resnet
from .sources import ModelSource, parse_model_name, register_source
from .timm_source import TimmSource  # noqa: F401  (registers timm:NAME)

__all__ = ["ZooEntry", "ZOO", "build_model", "list_models", "default_transform"]

INIT_SEED = 0
CIFAR_TRANSFORM = TransformSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD)


@dataclass(frozen=True)
class ZooEntry:
    factory: Callable[..., nn.Module]
    transform: TransformSpec | None
    description: str


def _digits(num_classes: int = 10, pretrained: bool = True) -> nn.Module:
    return pretrained_digits_resnet() if pretrained else DigitsResNet(num_classes)


ZOO: dict[str, ZooEntry] = {
    "digits_resnet": ZooEntry(
        _digits, None, "embedded default: 7-layer residual CNN on sklearn digits, weights shipped in the package"
    ),
}
for _d in CIFAR_DEPTHS:
    ZOO[f"cifar_resnet{_d}"] = ZooEntry(
        lambda num_classes=10, pretrained=False, _d=_d: cifar_resnet(_d, num_classes),
        CIFAR_TRANSFORM,
        f"CIFAR ResNet-{_d} (akamaster layout; load weights with --checkpoint)",
    )


def list_models() -> dict[str, str]:
    """Registered zoo names with descriptions (torchvision classifiers are accepted too)."""
    return {k: v.description for k, v in ZOO.items()}


def _refuse_pretrained(name: str) -> None:
    raise UserError(f"--pretrained: {name} has no downloadable weights: drop it (weights come by --checkpoint)")


@register_source
class ZooSource(ModelSource):
    """The zoo: the embedded digits model (weights in the package) and the CIFAR ResNets."""

    prefix = "zoo"
    names = ZOO

    def build(self, name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
        if pretrained:  # the digits model's trained weights ship in the package; the others come by --checkpoint
            _refuse_pretrained(name)
        if name == "digits_resnet" and num_classes not in (None, 10):
            raise UserError("--num-classes: the embedded digits model has 10 classes: leave --num-classes out")
        kw = {} if num_classes is None else {"num_classes": num_classes}
        if name == "digits_resnet":  # its trained weights ship in the package
            kw["pretrained"] = True
        return ZOO[name].factory(**kw)

    def transform(self, name: str, pretrained: bool, model: nn.Module | None) -> TransformSpec | None:
        return ZOO[name].transform


@register_source
class TorchvisionSource(ModelSource):
    """torchvision's classification models (``resnet18`` or ``torchvision:resnet18``)."""

    prefix = "torchvision"
    usage = "<torchvision name>       any torchvision classification model, e.g. resnet18 (--pretrained downloads)"

    def build(self, name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
        import torchvision

        if name not in sorted(torchvision.models.list_models(module=torchvision.models)):
            raise UserError(
                f"unknown model {name!r}: use one of {', '.join(sorted(ZOO))}, a torchvision classifier "
                "(e.g. resnet18) or package.module:factory"
            )
        kw = {}
        if num_classes is not None and not pretrained:
            kw["num_classes"] = num_classes
        if not pretrained:
            return torchvision.models.get_model(name, weights=None, **kw)
        # the download goes to torch's hub folder: one it had to create is removed again if it fails
        with removing_new_folders(Path(torch.hub.get_dir()) / "checkpoints"):
            return torchvision.models.get_model(name, weights="DEFAULT", **kw)

    def transform(self, name: str, pretrained: bool, model: nn.Module | None) -> TransformSpec | None:
        if not pretrained:
            return IMAGENET_TRANSFORM
        import torchvision

        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        return TransformSpec(mean=tuple(t.mean), std=tuple(t.std), resize=t.resize_size[0], crop=t.crop_size[0])


@register_source
class CodeSource(ModelSource):
    """The user's own ``package.module:factory``: importing it runs that code."""

    prefix = "code"
    runs_code = True
    usage = "package.module:factory   your own model factory (imports your code)"

    def build(self, name: str, num_classes: int | None, pretrained: bool) -> nn.Module:
        if pretrained:  # before the user's code is imported
            _refuse_pretrained(name)
        fn = _import_factory(name)
        call = f"{name}()" if num_classes is None else f"{name}(num_classes={num_classes})"
        try:
            model = fn() if num_classes is None else fn(num_classes=num_classes)
        except Exception as e:  # the user's code: its failure is bad input, reported in one line
            first = (str(e).strip().splitlines() or [""])[0]
            raise UserError(
                f"--model {call} failed ({type(e).__name__}: {first}): pass a factory that takes no "
                "required arguments (num_classes optional) and returns an nn.Module"
            ) from None
        if not isinstance(model, nn.Module):
            raise UserError(
                f"--model {call} returned {type(model).__name__}, not an nn.Module: pass a factory that returns "
                "the model"
            )
        return model


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(
            f"cannot import module {mod_name!r} for --model {spec}: {e}; "
            "make it importable (PYTHONPATH) or pass a registered name (see `rr_alloc list`)"
        )
    try:
        fn = getattr(mod, attr)
    except AttributeError:
        raise UserError(
            f"--model {spec}: module {mod_name!r} has no attribute {attr!r}: pass --model package.module:factory"
        )
    if not callable(fn):
        raise UserError(f"{spec} is not callable: pass a function or class that returns an nn.Module")
    return fn


def default_transform(name: str, pretrained: bool = False, model: nn.Module | None = None) -> TransformSpec | None:
    """The model's own input transform (``None`` for the embedded digits model; timm's needs the ``model``)."""
    source, inner = parse_model_name(name)
    return source.transform(inner, pretrained, model)


def build_model(name: str, num_classes: int | None = None, pretrained: bool = False) -> nn.Module:
    """Instantiate a model by name (see module docstring). Weights: zoo default, or random from ``INIT_SEED``."""
    source, inner = parse_model_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return source.build(inner, num_classes, pretrained)
