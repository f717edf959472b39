"""Built-in models (a registry), checkpoints, and ``load_model`` for ``--model``."""
from . import resnet, vgg, vit  # noqa: F401  (fill the registry)
from .checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
from .checks import check_model_fits
from .loading import LoadedModel, load_model
from .normalize import Normalize
from .registry import MODELS, check_model_args, create_model, list_models, register_model

__all__ = [
    "MODELS",
    "LoadedModel",
    "Normalize",
    "check_model_args",
    "check_model_fits",
    "create_model",
    "is_checkpoint",
    "list_models",
    "load_checkpoint",
    "load_model",
    "register_model",
    "save_checkpoint",
]
