"""Shared fixtures: paths to the real data and weights beside the repository (../shared)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR = SHARED / "data" / "cifar10-jpeg"
CAMVID = SHARED / "data" / "camvid"
WEIGHTS = SHARED / "weights"
RESNET20 = WEIGHTS / "cifar10-resnet20-12fca82f.th"
RESNET56 = WEIGHTS / "cifar10-resnet56-4bfd9763.th"

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
