"""Training and evaluation: ``train``, ``evaluate``, atomic pickle-free checkpoints, exact resume, DDP, AMP.

>>> from slimcnn.engine import TrainConfig, train, evaluate
>>> result = train(model, loaders["train"], TrainConfig(epochs=1, out_dir="runs/x"))  # doctest: +SKIP
>>> evaluate(result.model, loaders["test"])["top1"]                                   # doctest: +SKIP
"""
from .evaluate import evaluate
from .recalibrate import recalibrate_bn
from .trainer import TrainConfig, TrainingDiverged, TrainResult, checkpoint_path, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "checkpoint_path", "evaluate", "recalibrate_bn", "train"]
