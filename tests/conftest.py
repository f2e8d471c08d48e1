"""Shared fixtures: paths to the real data and weights beside the repository (../shared), and the packaged
ResNet-20 checkpoint for the tests that need weights but no data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from slimcnn.data.embedded import DEMO_WEIGHTS
from slimcnn.models.checkpoint import public_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR = SHARED / "data" / "cifar10-jpeg"
CAMVID = SHARED / "data" / "camvid"
WEIGHTS = SHARED / "weights"
# The package ships the public ResNet-20 checkpoint byte for byte (slimcnn/assets, for the demo): tests that need
# these weights but no data read that copy and so run without ../shared.
RESNET20 = DEMO_WEIGHTS
RESNET56 = public_checkpoint("cifar_resnet56", WEIGHTS)

# Two pytest-xdist workers on two cores: one intra-op thread each avoids oversubscription (the CLI's --threads
# default reads OMP_NUM_THREADS, so in-process CLI calls keep to one thread too).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not CIFAR.is_dir():
        pytest.fail(f"real CIFAR-10 expected at {CIFAR} (../shared beside the repository)")
    return CIFAR


@pytest.fixture(scope="session")
def tiny():
    """96 class-balanced CIFAR-10 test images: the test split is small to decode, and in batches of 32 they give
    3 steps per epoch."""
    from slimcnn.data import balanced_subset, load_cifar10

    data = load_cifar10(CIFAR, "test", progress=False)
    return data.subset(balanced_subset(data.labels, 96, seed=0))


def top1_on_test_subset(model_dir: Path, test_limit: int, seed: int = 0) -> float:
    """Top-1 (percent) of the model saved at ``model_dir`` on the seeded class-balanced ``test_limit`` images of the
    CIFAR-10 test split, counted here with a plain loop: an independent check of the figure a report states."""
    import slimcnn
    from slimcnn.data import cifar10_loaders

    model = slimcnn.load(model_dir).eval()
    loader = cifar10_loaders(CIFAR, 50, test_limit=test_limit, seed=seed, splits=("test",))["test"]
    right = seen = 0
    with torch.no_grad():
        for x, y in loader:
            right += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    assert seen == test_limit
    return 100.0 * right / seen


def shuffled_loader(data):
    """The training loader the engine tests use: batches of 32, shuffled and augmented, seed 0."""
    from slimcnn.data import Loader

    return Loader(data, 32, shuffle=True, augment=True, seed=0)


def one_line_compress_error(capsys, argv: list[str]) -> str:
    """Run ``slimcnn compress`` in-process; assert exit 2 with exactly one error line (progress bars aside), and
    return that line."""
    from slimcnn.cli import main

    code = main(argv)
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln]  # the rest are progress bars
    assert code == 2 and len(errors) == 1 and lines[-1].startswith("slimcnn compress: error:"), lines
    return lines[-1]
