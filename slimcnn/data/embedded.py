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


def export_demo_folder(dest: str | Path) -> Path:
    """Write the embedded subset as a CIFAR-10 image folder, ``dest/{train,test}/<class>/<n>.jpg``, the layout of
    ``../shared/data/cifar10-jpeg``, with the original JPEG bytes: any command's ``--data`` reads it.

    The folder appears whole or not at all (written beside ``dest``, then renamed), so concurrent callers such as
    parallel test workers may share one ``dest``; an existing ``dest`` is returned as it is.

    >>> import tempfile
    >>> root = export_demo_folder(Path(tempfile.mkdtemp()) / "cifar10-demo")
    >>> sum(1 for _ in (root / "test").rglob("*.jpg")), sorted(p.name for p in (root / "train").iterdir())[:2]
    (1000, ['airplane', 'automobile'])
    """
    import os
    import shutil
    import tempfile

    dest = Path(dest)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    with np.load(DEMO_DATA, allow_pickle=False) as z:
        classes = [str(c) for c in z["classes"]]
        for split in ("train", "test"):
            blob, offsets, labels = z[f"{split}_jpeg"], z[f"{split}_offsets"], z[f"{split}_labels"]
            for c in classes:
                (tmp / split / c).mkdir(parents=True)
            for i, label in enumerate(labels.tolist()):
                (tmp / split / classes[label] / f"{i:05d}.jpg").write_bytes(blob[offsets[i]:offsets[i + 1]].tobytes())
    try:
        os.rename(tmp, dest)
    except OSError:  # another process renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
    return dest
