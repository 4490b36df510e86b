"""Structured pruning of a ``SmallCNN``: whole convolution filters out, a smaller network back.

``slim`` keeps, in every convolution, the filters that matter most and rebuilds the network with
those widths, copying the kept weights; the result is an ordinary, smaller ``SmallCNN`` that
exports, quantizes and serves like any other. What matters is judged by the filter's batch
normalization scale |gamma| when the network has batch normalization (Liu et al., "Learning
Efficient Convolutional Networks through Network Slimming", 2017: the scale is what the filter's
map is multiplied by, while the weights' own size is undone by the normalization), and by the L1
norm of the filter's weights otherwise (Li et al., "Pruning Filters for Efficient ConvNets", 2017).

Written here rather than taken from a pruning library: MaxMin passes each filter's map on twice,
as relu(S) in the first half of its output and relu(-S) in the second, so dropping filter c drops
input channels c and C + c of the next layer and the matching columns of the hidden layer after
the flatten. The general dependency-graph pruners we tried (Torch-Pruning 1.6) pruned only one
half of that concatenation before the flatten and left a hidden layer of the wrong size.

The hidden layer and the classifier keep their units: the convolutions hold the compute, and the
hidden layer's inputs shrink with the last convolution's filters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.cnn import SmallCNN


def filter_importance(model: SmallCNN) -> list[torch.Tensor]:
    """For each convolution, one score per filter: |gamma| with batch norm, else the L1 norm."""
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    if norms:
        return [bn.weight.detach().abs().float() for bn in norms]
    return [c.weight.detach().abs().sum(dim=(1, 2, 3)).float() for c in convs]


def kept_filters(model: SmallCNN, keep: float) -> list[torch.Tensor]:
    """The indices (ascending) of the filters kept in each convolution: the ``keep`` fraction
    with the highest importance, rounded up, at least one."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    kept = []
    for scores in filter_importance(model):
        n = max(1, math.ceil(len(scores) * keep - 1e-9))
        # stable ordering on ties, so the same model always slims the same way
        order = torch.argsort(scores, descending=True, stable=True)[:n]
        kept.append(torch.sort(order).values)
    return kept


def slim(model: SmallCNN, keep: float) -> SmallCNN:
    """A new, smaller ``SmallCNN`` with the kept filters' weights (``model`` is not changed).

    With ``keep=1`` it answers exactly as ``model``; otherwise exactly as ``model`` with the
    dropped filters' outputs forced to zero (their batch-norm scale and shift, or their weights
    and bias, set to zero), which the tests check.
    """
    if not isinstance(model, SmallCNN):
        raise TypeError(f"slim prunes a SmallCNN, not a {type(model).__name__}")
    cfg = dict(model.config)
    kept = kept_filters(model, keep)
    cfg["widths"] = tuple(len(k) for k in kept)
    new = SmallCNN(**cfg)
    old_convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    new_convs = [m for m in new.features if isinstance(m, nn.Conv2d)]
    old_norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    new_norms = [m for m in new.features if isinstance(m, nn.BatchNorm2d)]
    maxmin = cfg["maxmin"]
    with torch.no_grad():
        inputs = torch.arange(cfg["in_channels"])  # the previous layer's kept output channels
        for i, (old, fresh) in enumerate(zip(old_convs, new_convs, strict=True)):
            out = kept[i]
            fresh.weight.copy_(old.weight[out][:, inputs])
            if old.bias is not None:
                fresh.bias.copy_(old.bias[out])
            if old_norms:
                ob, nb = old_norms[i], new_norms[i]
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(nb, name).copy_(getattr(ob, name)[out])
                nb.num_batches_tracked.copy_(ob.num_batches_tracked)
            # MaxMin's output holds relu(S) in channels [0, C) and relu(-S) in [C, 2C).
            inputs = torch.cat((out, out + old.out_channels)) if maxmin else out
        old_hidden, new_hidden = model.classifier[1], new.classifier[1]
        last = old_convs[-1].out_channels * (2 if maxmin else 1)
        per_map = model.flat_features // last  # flatten is channel-major: c * per_map + pixel
        columns = (inputs[:, None] * per_map + torch.arange(per_map)[None, :]).reshape(-1)
        new_hidden.weight.copy_(old_hidden.weight[:, columns])
        if old_hidden.bias is not None:
            new_hidden.bias.copy_(old_hidden.bias)
        for old_m, new_m in zip(model.classifier[2:], new.classifier[2:], strict=True):
            new_m.load_state_dict(old_m.state_dict())
    return new.train(model.training)
