"""The paper's small CIFAR-10 network, plain and with MaxMin, for any square input size.

Three 5x5 convolutions (32, 32, 64 maps), each followed by its activation and a 3x3 stride-2 max
pooling, then a 64-unit hidden layer and the classifier. MaxMin doubles the maps each convolution
passes on, so the next convolution and the hidden layer see twice the inputs.

Each builder takes ``widths`` so that a structurally pruned model (``models.slim``) is rebuilt from
its checkpoint under its own name with fewer maps.
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
        norm: str = "none",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        self.config = {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "image_size": image_size,
            "widths": tuple(int(w) for w in widths),
            "maxmin": maxmin,
            "hidden": hidden,
            "fused": fused,
            "norm": norm,
        }
        if any(w < 1 for w in self.config["widths"]):
            raise ValueError(f"every width must be at least 1, got {tuple(widths)}")
        layers: list[nn.Module] = []
        channels = in_channels
        if norm not in ("none", "batch"):
            raise ValueError(f"norm must be 'none' or 'batch', got {norm!r}")
        bn = norm == "batch"
        for width in widths:
            layers.append(nn.Conv2d(channels, width, kernel_size=5, padding=2, bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(width))
            layers.append(MaxMinPool(fused=fused) if maxmin else ReluPool())
            channels = 2 * width if maxmin else width
        self.features = nn.Sequential(*layers)
        with torch.no_grad():  # a dry run gives the flattened size for any input size
            probe = torch.zeros(1, in_channels, image_size, image_size)
            self.flat_features = self.features(probe).numel()
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(self.flat_features, hidden, bias=not bn)]
        if bn:
            head.append(nn.BatchNorm1d(hidden))
        head += [nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)]
        self.classifier = nn.Sequential(*head)

        if not bn:
            self._init_weights(maxmin)
        # With batch normalization, PyTorch's own initialization stays. A layer followed by batch
        # norm passes on the same signal whatever its scale; its scale only sets how far each step
        # moves it relative to its size (about lr / |w|^2). He's scale, about 2.4x PyTorch's,
        # would make every step of the shared recipe some 6x smaller, and the models underfit
        # skewed data within the budget (docs/training.md).

    def _init_weights(self, maxmin: bool) -> None:
        """Without normalization: He initialization with the gain of the activation that follows,
        so every layer passes on signals of the same size in both networks. ReLU keeps half of
        its input's energy (gain sqrt 2); MaxMin keeps all of it in twice the maps (gain 1).
        PyTorch's default init instead shrinks the signal at every layer, which leaves faint
        defects a vanishing gradient and the nets sitting at the class prior for many epochs
        (docs/training.md)."""
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                gain = "linear" if maxmin else "relu"
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity=gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        hidden, out = self.classifier[1], self.classifier[-1]
        nn.init.kaiming_normal_(hidden.weight, mode="fan_in", nonlinearity="relu")
        if hidden.bias is not None:
            nn.init.zeros_(hidden.bias)
        nn.init.normal_(out.weight, std=0.01)  # start from near-uniform answers
        nn.init.zeros_(out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model()
def baseline(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 64,
    norm: str = "none",
    widths: Sequence[int] | None = None,
) -> SmallCNN:
    """The plain CNN: ReLU after each convolution (32, 32, 64 maps)."""
    return SmallCNN(
        num_classes,
        in_channels,
        image_size,
        widths=(32, 32, 64) if widths is None else widths,
        maxmin=False,
        norm=norm,
    )


@register_model()
def maxmin(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 64,
    norm: str = "none",
    widths: Sequence[int] | None = None,
) -> SmallCNN:
    """The MaxMin CNN: the same widths, MaxMin after each convolution (about 2x the parameters)."""
    return SmallCNN(
        num_classes,
        in_channels,
        image_size,
        widths=(32, 32, 64) if widths is None else widths,
        maxmin=True,
        norm=norm,
    )


@register_model()
def maxmin_half(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 64,
    norm: str = "none",
    widths: Sequence[int] | None = None,
) -> SmallCNN:
    """MaxMin with halved widths (16, 16, 32): the cost-matched control for the baseline."""
    return SmallCNN(
        num_classes,
        in_channels,
        image_size,
        widths=(16, 16, 32) if widths is None else widths,
        maxmin=True,
        norm=norm,
    )
