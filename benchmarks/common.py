"""What every script under benchmarks/ shares: where the real data and weights are, which checkpoint a model
starts from, the environment record and how a results file is written.

The scripts run from a checkout that has ``../shared`` beside it (see the README); every path can be overridden
on the command line, so nothing here assumes more than the defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
#: the data sets under ../shared/data, by the name a script asks for
DATA = {"cifar10": SHARED / "data" / "cifar10-jpeg", "camvid": SHARED / "data" / "camvid"}
WEIGHTS = SHARED / "weights"
RESULTS = REPO / "benchmarks" / "results"

if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` from anywhere: import this checkout's slimcnn
    sys.path.insert(0, str(REPO))


def add_data_args(p: argparse.ArgumentParser, data: str | None = "cifar10", weights: bool = False) -> None:
    """``--data`` (default: the ``data`` set under ../shared; None: no default, the script picks per task) and,
    with ``weights``, ``--weights-dir`` (default ../shared/weights)."""
    default = str(DATA[data]) if data else None
    p.add_argument("--data", default=default,
                   help=f"data root (default: {default})" if default else "data root (default: the task's set under "
                                                                          "../shared/data)")
    if weights:
        p.add_argument("--weights-dir", default=str(WEIGHTS),
                       help=f"folder with the public checkpoints (default: {WEIGHTS})")


def checkpoint(model_name: str, weights_dir: str | Path = WEIGHTS) -> Path:
    """The public checkpoint of a zoo model; a one-line exit when it is not there."""
    from slimcnn.models.checkpoint import CheckpointError, public_checkpoint

    try:
        path = public_checkpoint(model_name, weights_dir)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    if not path.is_file():
        raise SystemExit(f"no public checkpoint for {model_name} at {path}")
    return path


def command(script: str, argv: list[str] | None) -> str:
    """The command line that produced a result, as recorded beside it."""
    return f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def environment() -> dict[str, Any]:
    """Versions and machine (slimcnn's own record, the same as in every report.json)."""
    from slimcnn.report import environment as env

    return env()


def write_json(path: str | Path, doc: dict[str, Any]) -> Path:
    """Write a result atomically (a half-written file never replaces a good one), creating its folder."""
    from slimcnn.report import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1))
    return path
