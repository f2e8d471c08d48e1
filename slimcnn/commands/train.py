"""``slimcnn train``: train or fine-tune a model, evaluate it on the test split, save it.

    slimcnn train --model cifar_resnet20 --weights ../shared/weights/cifar10-resnet20-12fca82f.th \\
                  --data ../shared/data/cifar10-jpeg --epochs 10 --lr 0.01 --out runs/r20
    torchrun --nproc_per_node 2 -m slimcnn train ...      # DDP: --batch-size is per process

The run folder gets ``last.safetensors`` (the resumable checkpoint, rewritten every epoch), ``train.json``
(history, test metrics, settings; for a RIG/DIG model also ``gating``: its options and ``gate_stats``, the
gates' mean and std per stage and iteration over the test split, see :mod:`slimcnn.gating.stats`) and the final
model saved with ``slimcnn.io.save``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_data_args, add_model_args, adopt_num_classes, build_model
from .eval import add_device_args, data_loaders, device_of, print_metrics


def add_parser(sub) -> None:
    from ..engine.trainer import SCHEDULES

    p = sub.add_parser("train", help="train or fine-tune a model (resumable; DDP under torchrun)",
                       description="Train with SGD, evaluate on the test split at the end and save the model. "
                                   "Under torchrun every process trains on its shard (--batch-size per process).")
    add_model_args(p, task=True)
    add_data_args(p)
    p.add_argument("--epochs", type=int, default=1, help="number of epochs (default 1)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default 0.05)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay (default 5e-4)")
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="LR schedule, stepped every iteration; step: x0.1 at 50%% and 75%% of the run")
    p.add_argument("--warmup-epochs", type=float, default=0, help="linear LR warm-up length in epochs (default 0)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps in all (the schedule still spans --epochs); for quick runs")
    p.add_argument("--out", required=True, help="run folder: checkpoint, train.json and the final model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_device_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .common import UserError
    from ..engine import TrainConfig, TrainingDiverged, evaluate, train
    from ..engine import distributed

    device = device_of(args)
    rank, world = distributed.init_distributed(device)
    try:
        loaders = data_loaders(args, ("train", "test"), rank, world)
        adopt_num_classes(args, loaders)
        model = build_model(args)
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                          weight_decay=args.weight_decay, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
                          seed=args.seed, device=device, amp=args.amp, out_dir=args.out, max_steps=args.max_steps,
                          task=args.task, progress=not args.no_progress)
        try:
            result = train(model, loaders["train"], cfg, resume=args.resume)
        except TrainingDiverged as e:
            raise UserError(str(e)) from None
        if rank == 0:
            from ..gating import FeedbackNet, collect_gate_stats

            with collect_gate_stats(result.model) as stats:  # hooks read the gates during this same evaluation
                metrics = evaluate(result.model, loaders["test"], task=args.task, device=cfg.device, amp=args.amp,
                                   progress=cfg.progress)
            print_metrics(metrics, args.task)
            net = getattr(result.model, "module", result.model)
            gating = None
            if isinstance(net, FeedbackNet):  # the settings an ablation row is told apart by, beside its gates
                gating = {"wrapper": type(net).__name__, "iterations": net.iterations, "gate_type": net.gate_type,
                          "gate_stages": net.gate_stages, "share_gates": net.share_gates, "bn": net.bn,
                          "gate_init": net.gate_init, "loss_all_iterations": net.loss_all_iterations,
                          "gate_stats": stats.result()}
            _write_summary(args, cfg, result, metrics, world, gating)
            _save_model(result.model, Path(args.out), result.checkpoint)
        distributed.barrier()  # the other ranks wait for rank 0's evaluation before leaving the group
    finally:
        distributed.cleanup()
    return 0


def _write_summary(args: argparse.Namespace, cfg, result, metrics: dict, world: int,
                   gating: dict | None = None) -> None:
    from ..engine.trainer import config_record

    summary = {"model": args.model, "weights": args.weights, "data": args.data, "world_size": world,
               "steps": result.steps, "history": result.history, "test": metrics,
               "replica_digests": result.replica_digests, "config": config_record(cfg)}
    if gating is not None:
        summary["gating"] = gating
    path = Path(args.out) / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")


def _save_model(model, out: Path, checkpoint: Path | None) -> None:
    try:
        from .. import io as slim_io
    except ModuleNotFoundError as e:
        if e.name != "slimcnn.io":
            raise
        print(f"note: slimcnn.io is not in this version, so the model was not saved in slimcnn's format; "
              f"its weights are in the training checkpoint {checkpoint}")
        return
    slim_io.save(model, out)
    print(f"saved: {out}")
