"""Model factories that tests pass as ``--model factories:NAME``."""

import torch
from torch import nn


def no_prunable() -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_digits_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


class _BranchyBlock(nn.Module):
    """A residual block whose forward branches on an argument and on data (torch.fx cannot trace it),
    like the EfficientNet-Lite blocks users bring."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(ch)

    def forward(self, x, drop_path: float = 0.0):
        out = self.bn(self.conv(x))
        if self.training and drop_path > 0:  # argument-dependent
            out = out * (torch.rand(out.shape[0], 1, 1, 1) > drop_path)
        if x.abs().sum() >= 0:  # data-dependent (always true)
            out = out + x
        return torch.relu(out)


class BranchyNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_ch: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = _BranchyBlock(8)
        self.block2 = _BranchyBlock(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x), drop_path=0.1))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def branchy_net(num_classes: int = 10) -> nn.Module:
    return BranchyNet(num_classes)


def plain_vgg(num_classes: int = 10) -> nn.Module:
    """VGG-style: no residual block, no BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def vgg11_bn_small(num_classes: int = 10) -> nn.Module:
    """torchvision's VGG-11-BN (its class and forward) with a narrow classifier for small images.

    The stock classifier (25088 -> 4096 -> 4096) holds 119 of its 129 M weights and makes a
    CPU run take minutes; the family's structure (plain conv-BN stacks, no residual block) is the same.
    """
    import torchvision

    model = torchvision.models.get_model("vgg11_bn", weights=None, num_classes=num_classes)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Linear(512, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, num_classes),
    )
    return model


def raises(num_classes: int = 10) -> nn.Module:
    """A factory that fails (a missing file, a bad config ...), with a multi-line message."""
    raise RuntimeError("weights file missing\nsecond line")


def returns_none(num_classes: int = 10):
    return None


class AuxHeadCNN(nn.Module):
    """An auxiliary classifier that runs only in training mode (as in Inception and GoogLeNet)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = tiny_digits_cnn(num_classes)
        self.aux = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.body(x)
        if self.training:
            return out, self.aux(torch.flatten(x, 1))
        return out


def aux_head_cnn(num_classes: int = 10) -> nn.Module:
    return AuxHeadCNN(num_classes)


class AllConvNet(nn.Module):
    """No nn.Linear, no residual block: the classifier is a 1x1 conv averaged over space (SqueezeNet-like)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        return self.classifier(self.features(x)).mean((2, 3))


def all_conv_net(num_classes: int = 10) -> nn.Module:
    return AllConvNet(num_classes)


def reflect_padded_cnn(num_classes: int = 10) -> nn.Module:
    """A CNN whose second conv pads by reflection (a layer the reconstruction does not re-fit)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


class _Tied(nn.Module):
    """Two 3x3 convolutions that share one weight tensor (tied weights), then a classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.a(torch.relu(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


def tied_convs(num_classes: int = 10) -> nn.Module:
    return _Tied(num_classes)


def shifted_digits_resnet(num_classes: int = 10) -> nn.Module:
    """The embedded digits model with BatchNorm statistics of other inputs (its first BatchNorm expects the
    images shifted by one and a half standard deviations): recalibrating on the digits moves this dense model."""
    from rr_alloc.models.digits import pretrained_digits_resnet

    model = pretrained_digits_resnet()
    first = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        first.running_mean += 1.5 * first.running_var.sqrt()
    return model
