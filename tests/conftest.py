"""Shared fixtures and the two markers of the full (CI) suite.

Most tests need only *some* real images and a trained net: they read what the package ships (the public
ResNet-20 and the embedded 1,500 / 1,000-image class-balanced CIFAR-10 subset, written here once as an image
folder, ``CIFAR``), so the README's test command passes on a clone with nothing beside it. Two markers move a test
out of that command into the full suite, ``python -m pytest -n 2 --full -m "shared or slow"`` (CI runs both):
- ``shared``: needs the full data sets or the other checkpoints in ``../shared`` (``SLIMCNN_SHARED`` moves it);
- ``slow``: an end-to-end check that takes tens of seconds to minutes on 2 cores.
Without ``--full`` (or, for ``shared``, without ../shared) they are skipped with one reason line that says how to run
them; under ``CI=true`` with ``--full`` a marked test that skips for any reason fails instead, so that CI cannot
pass with them silently skipped.
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch

from slimcnn.data.embedded import DEMO_DATA, DEMO_WEIGHTS, export_demo_folder
from slimcnn.models.checkpoint import public_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SLIMCNN_SHARED", REPO.parent / "shared"))
FULL_CIFAR = SHARED / "data" / "cifar10-jpeg"
CAMVID = SHARED / "data" / "camvid"
WEIGHTS = SHARED / "weights"
# The package ships the public ResNet-20 checkpoint byte for byte (slimcnn/assets, for the demo): tests that need
# these weights but no data read that copy and so run without ../shared.
RESNET20 = DEMO_WEIGHTS
RESNET56 = public_checkpoint("cifar_resnet56", WEIGHTS)
# The embedded subset as an image folder (1,500 train / 1,000 test), keyed by the npz's content so a changed
# asset gets a fresh folder; every xdist worker shares it (written atomically).
_DIGEST = hashlib.sha256(DEMO_DATA.read_bytes()).hexdigest()[:12]
CIFAR = export_demo_folder(Path(tempfile.gettempdir()) / f"slimcnn-tests-{getpass.getuser()}" / f"cifar10-demo-{_DIGEST}")

FULL_COMMAND = 'python -m pytest -n 2 --full -m "shared or slow"'
SHARED_HOW = (f"needs the full data sets and checkpoints in {SHARED} (../shared beside the repository); "
              f"run the full suite with: {FULL_COMMAND}")
SLOW_HOW = f"a slow end-to-end check, in the full suite only; run it with: {FULL_COMMAND}"

# Two pytest-xdist workers on two cores: one intra-op thread each avoids oversubscription (the CLI's --threads
# default reads OMP_NUM_THREADS, so in-process CLI calls keep to one thread too).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def shared_present() -> bool:
    return all(p.is_dir() for p in (FULL_CIFAR, CAMVID, WEIGHTS))


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true",
                     help="also run the tests marked shared (full CIFAR-10, CamVid and the public checkpoints in "
                          "../shared) and slow (end-to-end checks); under CI=true a marked test that skips fails")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shared: needs ../shared (full data sets, checkpoints); runs with --full")
    config.addinivalue_line("markers", "slow: an end-to-end check of tens of seconds or more; runs with --full")


def _marked(item: pytest.Item) -> bool:
    return item.get_closest_marker("shared") is not None or item.get_closest_marker("slow") is not None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not _marked(item):
        return
    needs_shared = item.get_closest_marker("shared") is not None
    if not item.config.getoption("--full"):
        pytest.skip(SHARED_HOW if needs_shared else SLOW_HOW)
    if needs_shared and not shared_present():
        if _in_ci():
            pytest.fail(f"CI=true and {SHARED} is missing (or lacks data/cifar10-jpeg, data/camvid, weights): "
                        "a test marked shared must run in CI", pytrace=False)
        pytest.skip(SHARED_HOW)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Under CI=true with --full, a marked test that skips for any reason (an import, a missing file) fails."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _in_ci() and item.config.getoption("--full") and _marked(item):
        report.outcome = "failed"
        report.longrepr = f"a test of the full suite skipped under CI=true: {report.longrepr}"


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    skipped = [str(r.longrepr) for r in terminalreporter.stats.get("skipped", [])]
    for how, what in ((SHARED_HOW, "shared"), (SLOW_HOW, "slow")):
        n = sum(how in r for r in skipped)
        if n:
            terminalreporter.write_line(f"{n} test(s) marked {what} skipped: {how}")


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The embedded CIFAR-10 subset as an image folder (``train``: 1,500 images, ``test``: 1,000)."""
    return CIFAR


@pytest.fixture(scope="session")
def tiny():
    """96 class-balanced CIFAR-10 test images from the embedded subset: in batches of 32 they give 3 steps per
    epoch."""
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


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` imported as module ``<name>`` (registered, so that its dataclasses find their
    module) with its folder on the path (the scripts import their neighbour ``common``); both undone after."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(folder))
