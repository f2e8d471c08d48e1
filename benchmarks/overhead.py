"""Training-step time of each method relative to plain SGD, measured side by side in one run.

Machines here are shared and noisy, so absolute times mean little: every configuration runs a few steps in
turn, round after round, on the same model, batch and thread count, and we report median step time ratios.

    python benchmarks/overhead.py --model cifar_resnet56 --methods csgd,trp,trp:period=5,dagger --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

from common import command, environment, write_json  # first: puts this checkout's slimcnn on the path

import torch
import torch.nn.functional as F

import slimcnn
from slimcnn.data import Loader, load_demo
from slimcnn.methods.base import Method


def parse_method(spec: str) -> tuple[str, str, dict]:
    """``trp:period=5,energy=0.9`` -> (label, name, kwargs)."""
    name, _, opts = spec.partition(":")
    kw = {}
    for item in filter(None, opts.split(";")):
        k, _, v = item.partition("=")
        try:
            kw[k] = json.loads(v)
        except json.JSONDecodeError:
            kw[k] = v
    return spec, name, kw


def make_step(model, method: Method, lr: float = 0.05):
    opt = torch.optim.SGD(method.param_groups(model, lr=lr, weight_decay=5e-4), lr=lr, momentum=0.9)
    state = {"step": 0}

    def step(x, y):
        method.before_forward(model, state["step"])
        loss = F.cross_entropy(model(x), y) + method.loss(model)
        loss.backward()
        method.after_backward(model, state["step"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(model, state["step"])
        state["step"] += 1

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--methods", default="csgd,trp,trp:period=5,dagger",
                   help="comma list; options after ':' separated by ';' (e.g. trp:period=5;scheme=spatial)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="steps per configuration per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = next(iter(Loader(load_demo("train"), args.batch_size, shuffle=True, augment=True)))
    base = slimcnn.create(args.model)
    configs = {"sgd": (copy.deepcopy(base), Method())}
    for spec in filter(None, args.methods.split(",")):
        label, name, kw = parse_method(spec)
        m = slimcnn.methods.create(name, target_macs=args.target_macs, **kw)
        configs[label] = (m.prepare(copy.deepcopy(base), x[:2]), m)
    steps = {k: make_step(model, m) for k, (model, m) in configs.items()}
    for k, (model, _) in configs.items():  # warm-up: first steps allocate
        model.train()
        steps[k](x, y)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        for k in configs:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[k](x, y)
            times[k].append((time.perf_counter() - t0) / args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()),
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "batch_size": args.batch_size, "steps_per_round": args.steps,
              "rounds": args.rounds, "step_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
              "ratio_vs_sgd": {k: round(v / med["sgd"], 4) for k, v in med.items() if k != "sgd"},
              "command": command("overhead.py", argv), "environment": environment()}
    print(json.dumps(result["ratio_vs_sgd"], indent=1))
    for k, v in result["ratio_vs_sgd"].items():
        print(f"step_time_ratio[{k} / sgd]: {v:.3f}")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
