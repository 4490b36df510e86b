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


def _random_norms(model: nn.Module) -> nn.Module:
    """Batch-norm scales, shifts and statistics away from their initial values, so that dropping
    a filter changes the answers."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) * 0.9 + 0.1)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_mean.copy_((torch.rand(n, generator=gen) - 0.5) * 0.2)
    return model.eval()


@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("arch", ["baseline", "maxmin", "maxmin_half"])
def test_slim_is_the_network_without_the_dropped_filters(arch: str, norm: str) -> None:
    """The slimmed network answers exactly as the original with the dropped filters' outputs set
    to zero: MaxMin's two halves and the hidden layer's columns are cut consistently."""
    from models.slim import kept_filters, slim

    torch.manual_seed(0)
    model = _random_norms(
        create_model(arch, num_classes=4, in_channels=3, image_size=37, norm=norm)
    )
    x = torch.randn(5, 3, 37, 37)
    with torch.no_grad():
        original = model(x)
        assert torch.equal(slim(model, 1.0).eval()(x), original)
        small = slim(model, 0.4).eval()
        kept = kept_filters(model, 0.4)
        full = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
        assert small.config["widths"] == tuple(-(-w * 4 // 10) for w in full)
        assert count_params(small) < 0.5 * count_params(model)
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
        for i, keep in enumerate(kept):
            drop = torch.ones(convs[i].out_channels, dtype=torch.bool)
            drop[keep] = False
            if norms:
                norms[i].weight[drop] = 0
                norms[i].bias[drop] = 0
            else:
                convs[i].weight[drop] = 0
                convs[i].bias[drop] = 0
        masked = model(x)
        torch.testing.assert_close(small(x), masked, atol=1e-5, rtol=1e-5)
        # dropping the filters did change the answers, so the comparison above could fail
        assert not torch.allclose(masked, original, atol=1e-3)


def test_slim_keeps_the_most_important_filters() -> None:
    from models.slim import kept_filters

    model = create_model("maxmin", num_classes=3, in_channels=1, image_size=24, norm="batch")
    first = next(m for m in model.features if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        first.weight.copy_(torch.linspace(0.01, 1.0, first.num_features))
        first.weight[3] = 5.0  # a low index with the largest scale
    kept = kept_filters(model, 0.25)[0]
    assert kept.tolist() == [3, *range(25, 32)]
    with pytest.raises(ValueError, match="keep must be in"):
        kept_filters(model, 0.0)


def test_a_slimmed_network_rebuilds_from_its_widths(tmp_path) -> None:  # noqa: ANN001
    """A pruned checkpoint loads under its model's own name, with its widths."""
    from inspectlib.checkpoint import load_checkpoint, save_checkpoint
    from inspectlib.preprocess import Preprocess
    from models.slim import slim

    model = _random_norms(
        create_model("maxmin", num_classes=3, in_channels=1, image_size=24, norm="batch")
    )
    small = slim(model, 0.5).eval()
    kwargs = {"num_classes": 3, "in_channels": 1, "image_size": 24, "norm": "batch"}
    pre = Preprocess(size=24, channels=1, mean=(0.5,), std=(0.25,))
    meta = {
        "arch": "maxmin",
        "model_kwargs": {**kwargs, "widths": list(small.config["widths"])},
        "classes": ["a", "b", "c"],
        "preprocess": pre.to_dict(),
    }
    save_checkpoint(small.state_dict(), meta, tmp_path / "small")
    loaded, _ = load_checkpoint(tmp_path / "small")
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert loaded.config["widths"] == (16, 16, 32)
