"""Are Dagger's per-layer widths stable across seeds? Runs the search from several seeds and reports the spread.

Each seed changes the Dagger module's initialisation and the order of the training batches; the base weights,
data and target are the same. For every prunable channel group the script reports the width chosen by each
seed, its mean, standard deviation and range, and writes JSON (plus the command, versions and machine).

    python benchmarks/dagger_stability.py --model cifar_resnet56 --weights public \\
        --target-macs 0.5 --seeds 0 1 2 --steps 1000 --out benchmarks/results/dagger_stability_r56.json

``--weights public`` starts from the model's public checkpoint in ``--weights-dir``; data and weights default to
../shared (benchmarks/common.py).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

from common import add_data_args, checkpoint, command, environment, write_json  # first: this checkout's slimcnn

import torch
from torch import nn


def width_stability(make_model: Callable[[], nn.Module], loader: Iterable, example_input: torch.Tensor,
                    seeds: Sequence[int], target_macs: float = 0.5, steps: int = 200, lr: float = 0.01,
                    progress: bool = False, **dagger_kw: Any) -> dict[str, Any]:
    """Run the Dagger search (``steps`` SGD steps, then finalize) once per seed; per-group widths and spread.

    >>> res = width_stability(lambda: create("cifar_resnet20"), loader, x, seeds=[0, 1], steps=50)  # doctest: +SKIP
    >>> res["groups"]["conv1"]["widths"]                                                            # doctest: +SKIP
    [9, 10]
    """
    from slimcnn.engine import TrainConfig, train
    from slimcnn.methods.dagger import Dagger
    from slimcnn.profile import profile

    runs = []
    for seed in seeds:
        method = Dagger(target_macs=target_macs, seed=seed, **dagger_kw)
        model = method.prepare(make_model(), example_input)
        epochs = max(1, math.ceil(steps / len(loader)))  # type: ignore[arg-type]
        cfg = TrainConfig(epochs=epochs, lr=lr, schedule="constant", seed=seed, max_steps=steps, progress=progress)
        train(model, loader, cfg, method=method)
        compact = method.finalize(model)
        rep = method.report()
        runs.append({"seed": seed, "widths": dict(method.widths),
                     "macs": profile(compact, tuple(example_input.shape[1:])).macs,
                     "final_soft_macs_ratio": rep["soft_macs"][-1] / rep["base_macs"] if rep["soft_macs"] else None})
    base = rep["base_widths"]
    groups = {}
    for key, size in base.items():
        w = [r["widths"].get(key, size) for r in runs]
        groups[key] = {"size": size, "widths": w, "mean": statistics.fmean(w),
                       "std": statistics.pstdev(w), "range": max(w) - min(w)}
    spread = [g["std"] / g["size"] for g in groups.values()]
    return {"runs": runs, "groups": groups, "mean_relative_std": statistics.fmean(spread),
            "max_relative_std": max(spread)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--weights", default=None, help="a checkpoint path, or 'public' for the model's public checkpoint "
                                                    "(default: random init)")
    add_data_args(p, "cifar10", weights=True)
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200, help="search steps per seed")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--lambda-flops", type=float, default=None, help="default: the method's")
    p.add_argument("--anneal-steps", type=int, default=None, help="default: --steps")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)

    from slimcnn.data import cifar10_loaders
    from slimcnn.models import create, load_checkpoint

    weights = checkpoint(args.model, args.weights_dir) if args.weights == "public" else args.weights

    def make_model() -> nn.Module:
        model = create(args.model)
        return load_checkpoint(model, weights) if weights else model

    loader = cifar10_loaders(args.data, batch_size=args.batch_size, train_limit=args.train_limit,
                             splits=("train",))["train"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t0 = time.time()
    extra = {"lambda_flops": args.lambda_flops} if args.lambda_flops is not None else {}
    res = width_stability(make_model, loader, x, args.seeds, args.target_macs, args.steps, args.lr, progress=True,
                          anneal_steps=args.anneal_steps or args.steps, **extra)
    res.update({"command": command("dagger_stability.py", argv), "seconds": round(time.time() - t0, 1),
                "environment": environment(), "args": vars(args)})
    print(f"{'group':<24} {'size':>5}  widths per seed   std")
    for key, g in res["groups"].items():
        print(f"{key:<24} {g['size']:>5}  {str(g['widths']):<16} {g['std']:.2f}")
    print(f"mean relative std {res['mean_relative_std']:.4f}, max {res['max_relative_std']:.4f}; "
          f"MACs per seed {[r['macs'] for r in res['runs']]}")
    if args.out:
        write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
