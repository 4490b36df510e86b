"""Every registered model: forward pass for several sizes and channel counts, and the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import create_model, list_models, register_model
from training.measure import count_params


def test_registry_has_the_three_models() -> None:
    assert {"baseline", "maxmin", "maxmin_half"} <= set(list_models())


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet'.*baseline"):
        create_model("resnet", num_classes=3)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("baseline")(lambda **kw: nn.Identity())


@pytest.mark.parametrize("arch", list_models())
@pytest.mark.parametrize("size", [16, 32, 64, 97])
@pytest.mark.parametrize("channels", [1, 3])
def test_forward(arch: str, size: int, channels: int, device: torch.device) -> None:
    model = create_model(arch, num_classes=5, in_channels=channels, image_size=size).to(device)
    out = model(torch.randn(2, channels, size, size, device=device))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


def test_maxmin_doubles_what_the_next_layer_sees() -> None:
    base = create_model("baseline", num_classes=6, in_channels=3, image_size=64)
    mm = create_model("maxmin", num_classes=6, in_channels=3, image_size=64)
    half = create_model("maxmin_half", num_classes=6, in_channels=3, image_size=64)
    assert mm.features[2].in_channels == 2 * base.features[2].in_channels
    assert mm.flat_features == 2 * base.flat_features
    ratio = count_params(mm) / count_params(base)
    assert 1.8 < ratio < 2.1
    # The cost-matched control is no bigger than the baseline.
    assert count_params(half) <= count_params(base)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 1}, {"num_classes": 3, "in_channels": 2}, {"num_classes": 3, "image_size": 4}],
)
def test_bad_constructor_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        create_model("maxmin", **kwargs)
