"""``slimcnn models``: the model names the other commands accept, so nobody has to read the source for them.

    slimcnn models               # the zoo, the torchvision classifiers, and how saved models are given
    slimcnn models 'cifar_*' --macs

Three syntaxes reach a model: a zoo name (``slimcnn.list_models()``), ``tv:<name>`` for any classification
builder torchvision offers (fresh weights: slimcnn never downloads), and a model saved by slimcnn, given to
``--weights``, which brings its own architecture. The ``--model`` help of every command points here.
"""
from __future__ import annotations

import argparse
import fnmatch
import shutil
import textwrap


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the model names the commands accept (zoo, tv:<torchvision name>)",
                       description="List the names that `slimcnn profile --model` (and eval, train, compress) "
                                   "accept: the zoo, with each model's default input and whether feedback gating "
                                   "can wrap it, and the torchvision classifiers reachable as tv:<name>.")
    p.add_argument("pattern", nargs="?", default=None,
                   help="only names matching this shell pattern, e.g. 'cifar_*' or 'resnet*'")
    p.add_argument("--macs", action="store_true",
                   help="also count MACs and params of each zoo model at its default input, 10 classes "
                        "(zoo models only; a few seconds)")
    p.set_defaults(func=run)


def torchvision_names() -> list[str]:
    """What ``tv:<name>`` accepts: the classification builders of ``torchvision.models``, the same query
    ``slimcnn.models.torchvision_models.build_torchvision`` checks names against."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def zoo_rows(pattern: str | None = None, macs: bool = False) -> list[dict]:
    """One row per zoo model: name, default input, gating support, the builder's one-line description and,
    with ``macs``, MACs and params. Gating support is found by trying it, so this list cannot drift from
    what ``--gating`` really accepts."""
    from ..models import create, default_input_size, list_models
    from ..models.registry import _REGISTRY

    rows = []
    for name in list_models(pattern):
        doc = (_REGISTRY[name].__doc__ or "").strip().splitlines()
        row = {"name": name, "input": default_input_size(name), "about": doc[0].replace("``", "") if doc else ""}
        try:
            create(name, gating="rig")
            row["gating"] = True
        except TypeError:  # not a staged backbone (stem, stages, head or decode)
            row["gating"] = False
        if macs:
            from ..profile import profile

            prof = profile(create(name), row["input"])
            row["macs"], row["params"] = prof.macs, prof.params
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    pattern = args.pattern[3:] if args.pattern and args.pattern.startswith("tv:") else args.pattern
    width = min(shutil.get_terminal_size((100, 24)).columns, 120)
    rows = zoo_rows(pattern, args.macs)
    print("zoo: --model NAME (fresh weights; --weights loads a checkpoint into it)")
    if rows:
        extra = f"{'MACs':>10}{'params':>10}" if args.macs else ""
        print(f"  {'name':<17}{'input':<11}{'gating':<8}{extra}  about")
        for r in rows:
            cols = f"{r['macs'] / 1e6:>9.2f}M{r['params'] / 1e6:>9.3f}M" if args.macs else ""
            shape = ",".join(map(str, r["input"]))
            print(f"  {r['name']:<17}{shape:<11}{'rig,dig' if r['gating'] else '-':<8}{cols}  {r['about']}")
    else:
        print("  (none matches)")
    names = [n for n in torchvision_names() if pattern is None or fnmatch.fnmatch(n, pattern)]
    print("\ntorchvision classifiers: --model tv:NAME (fresh weights, input 3,224,224; no download: load your "
          "own weights file with --weights)")
    print(textwrap.fill(", ".join(names) or "(none matches)", width=width, initial_indent="  ",
                        subsequent_indent="  ", break_on_hyphens=False))
    print("\ntimm models: --model timm:NAME (the timm extra: pip install -e \".[timm]\"; fresh weights, input "
          "3,224,224; never downloaded: --weights loads a local .pth/.pt/.safetensors file)")
    print("your own model: --model path/to/file.py:factory or --model package.module:factory (called with "
          "num_classes when it accepts it; default input 3,224,224, or --input)")
    print("\nsaved by slimcnn (a compress or train output): --weights FOLDER or FILE.safetensors; the save brings "
          "its own architecture (profile and compress still take the default input size from --model, or --input)")
    return 0
