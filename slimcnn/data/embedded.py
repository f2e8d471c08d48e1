"""The embedded default that ships inside the package so ``slimcnn demo`` runs on a fresh machine.

``assets/cifar10-demo.npz`` holds a class-balanced CIFAR-10 subset (1,500 train / 1,000 test images, 150 / 100
per class, drawn with a fixed seed from ``../shared/data/cifar10-jpeg``) as the original JPEG bytes, byte for
byte; ``assets/cifar10-resnet20-12fca82f.th`` is the public ResNet-20 checkpoint (akamaster/pytorch_resnet_cifar10,
BSD-2, see ``assets/LICENSE-akamaster.txt`` and ``assets/README.md``).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .cifar10 import ImageSet

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_WEIGHTS = ASSETS / "cifar10-resnet20-12fca82f.th"
DEMO_DATA = ASSETS / "cifar10-demo.npz"


def load_demo(split: str = "train") -> ImageSet:
    """Decode the embedded CIFAR-10 subset (``train``: 1,500 images, ``test``: 1,000)."""
    from PIL import Image

    with np.load(DEMO_DATA, allow_pickle=False) as z:
        blob, offsets, labels = z[f"{split}_jpeg"], z[f"{split}_offsets"], z[f"{split}_labels"]
        classes = [str(c) for c in z["classes"]]
    images = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    for i in range(len(labels)):
        with Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())) as im:
            images[i] = np.asarray(im.convert("RGB"))
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes)
