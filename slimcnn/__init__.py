"""slimcnn: make trained CNNs smaller and faster, and small CNNs better.

>>> import slimcnn
>>> model = slimcnn.create("cifar_resnet56")
>>> slimcnn.profile(model, (3, 32, 32)).macs
125485696
>>> method = slimcnn.methods.create("l1", target_macs=0.5)        # doctest: +SKIP
>>> slimcnn.save(model, "out/resnet56"); same = slimcnn.load("out/resnet56")  # doctest: +SKIP
"""
from . import gating, methods  # noqa: F401  (gating registers the rig/dig wrappers)
from .io import export_onnx, export_torchscript, load, save
from .models import create, list_models, load_checkpoint
from . import profile  # a callable module: slimcnn.profile(model, shape) runs slimcnn.profile.profile

__version__ = "0.1.0"
__all__ = ["create", "list_models", "load_checkpoint", "load", "save", "profile", "methods", "export_onnx",
           "export_torchscript", "__version__"]
