"""MaxMin (CReLU) and the fused MaxMin + max-pooling block.

MaxMin keeps both the presence, relu(S), and the absence, relu(-S), of each pattern a convolution
finds, so the next layer sees twice the maps (Blot, Cord & Thome, ICIP 2016; CReLU, Shang et al.).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def maxmin(x: torch.Tensor) -> torch.Tensor:
    """concat(relu(x), relu(-x)) along the channel dimension."""
    return torch.cat((F.relu(x), F.relu(-x)), dim=1)


class MaxMin(nn.Module):
    """The MaxMin activation: doubles the channels, concat(relu(x), relu(-x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maxmin(x)


class MaxMinPool(nn.Module):
    """MaxMin followed by max pooling, computed at pooled resolution when ``fused``.

    Max pooling commutes with ReLU (both are monotone), and max(-S) = -min(S), so
    pool(concat(relu(S), relu(-S))) = concat(relu(maxpool(S)), relu(-minpool(S))). The fused form
    pools the C maps of S twice instead of materializing 2C maps at full resolution.

    ``fused=None`` picks per device: fused on the CPU, where it moves less memory, naive on CUDA,
    where these small tensors are bound by kernel launches and the fused form launches more
    (``bench/fused_bench.py`` compares both on each device).
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2, fused: bool | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        fused = (not x.is_cuda) if self.fused is None else self.fused
        if not fused:
            return F.max_pool2d(maxmin(x), k, s, ceil_mode=True)
        high = F.max_pool2d(x, k, s, ceil_mode=True)
        low = F.max_pool2d(x.neg(), k, s, ceil_mode=True)
        return torch.cat((F.relu(high), F.relu(low)), dim=1)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, fused={self.fused}"


class ReluPool(nn.Module):
    """The plain network's ReLU + max pooling (pooling first: same result, fewer elements)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.max_pool2d(x, self.kernel_size, self.stride, ceil_mode=True))
