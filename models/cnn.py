"""The paper's small CIFAR-10 network, plain and with MaxMin, for any square input size.

Three 5x5 convolutions (32, 32, 64 maps), each followed by its activation and a 3x3 stride-2 max
pooling, then a 64-unit hidden layer and the classifier. MaxMin doubles the maps each convolution
passes on, so the next convolution and the hidden layer see twice the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.layers import MaxMinPool, ReluPool
from models.registry import register_model


class SmallCNN(nn.Module):
    """conv5x5 -> activation -> pool, three times; then a hidden layer and the classifier."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 64,
        widths: Sequence[int] = (32, 32, 64),
        maxmin: bool = False,
        hidden: int = 64,
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers.append(nn.Conv2d(channels, width, kernel_size=5, padding=2))
            layers.append(MaxMinPool(fused=fused) if maxmin else ReluPool())
            channels = 2 * width if maxmin else width
        self.features = nn.Sequential(*layers)
        with torch.no_grad():  # a dry run gives the flattened size for any input size
            probe = torch.zeros(1, in_channels, image_size, image_size)
            self.flat_features = self.features(probe).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.flat_features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model()
def baseline(num_classes: int, in_channels: int = 3, image_size: int = 64) -> SmallCNN:
    """The plain CNN: ReLU after each convolution (32, 32, 64 maps)."""
    return SmallCNN(num_classes, in_channels, image_size, widths=(32, 32, 64), maxmin=False)


@register_model()
def maxmin(num_classes: int, in_channels: int = 3, image_size: int = 64) -> SmallCNN:
    """The MaxMin CNN: the same widths, MaxMin after each convolution (about 2x the parameters)."""
    return SmallCNN(num_classes, in_channels, image_size, widths=(32, 32, 64), maxmin=True)


@register_model()
def maxmin_half(num_classes: int, in_channels: int = 3, image_size: int = 64) -> SmallCNN:
    """MaxMin with halved widths (16, 16, 32): the cost-matched control for the baseline."""
    return SmallCNN(num_classes, in_channels, image_size, widths=(16, 16, 32), maxmin=True)
