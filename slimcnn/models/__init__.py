"""Model zoo. ``create(name, num_classes=10, **kw)``, ``list_models()``, ``load_checkpoint(model, path)``."""
from . import cifar_resnet, cifar_vgg, seg  # noqa: F401  (registers the builders)
from .checkpoint import CheckpointError, load_checkpoint, read_state_dict
from ..layers import PadShortcut  # its home since issue 16; re-exported for users' imports
from .cifar_resnet import CifarResNet
from .external import ModelBuildError
from .registry import create, default_input_size, list_models, register

__all__ = ["create", "list_models", "register", "load_checkpoint", "read_state_dict", "default_input_size",
           "CheckpointError", "CifarResNet", "PadShortcut", "ModelBuildError"]
