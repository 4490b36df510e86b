"""CNN architectures compared by maxmin-inspect: the plain baseline and the MaxMin variants."""

# Importing the architecture modules registers their constructors.
from models import cnn as _cnn  # noqa: F401,E402
from models.registry import create_model, get_model_builder, list_models, register_model

__all__ = ["create_model", "get_model_builder", "list_models", "register_model"]
