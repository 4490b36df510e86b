"""A small name -> constructor registry (after torchvision's models/_api.py).

The registry name is the ``arch`` stored in each checkpoint, so a checkpoint can be rebuilt from its
metadata alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str | None = None) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a model constructor under ``name`` (its function name by default)."""

    def wrapper(fn: ModelBuilder) -> ModelBuilder:
        key = name or fn.__name__
        if key in _MODELS:
            raise ValueError(f"a model is already registered under the name {key!r}")
        _MODELS[key] = fn
        return fn

    return wrapper


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_MODELS)


def get_model_builder(name: str) -> ModelBuilder:
    """The constructor registered under ``name``; a clear error names the known ones otherwise."""
    try:
        return _MODELS[name]
    except KeyError:
        known = ", ".join(list_models())
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the architecture registered under ``name`` with constructor arguments ``kwargs``."""
    return get_model_builder(name)(**kwargs)
