"""Replace modules by others (e.g. TRP's factorised convs), on a copy, validated."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .validate import SurgeryError, reference_output, validate


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise SurgeryError(f"no module named {name!r}")
    setattr(parent, child, module)


def replace_modules(model: nn.Module, example_input: torch.Tensor, replacements: dict[str, nn.Module],
                    lossless_tol: float | None = None) -> nn.Module:
    """Return a copy of ``model`` with each named module replaced; the copy is validated by a forward pass
    (same output shape; same outputs within ``lossless_tol`` when given). ``model`` itself is untouched.

    >>> thin = replace_modules(model, x, {"layer1.0.conv1": nn.Sequential(conv_a, conv_b)})  # doctest: +SKIP
    """
    ref = reference_output(model, example_input)
    new = copy.deepcopy(model)
    for name, module in replacements.items():
        try:
            new.get_submodule(name)
        except AttributeError:
            raise SurgeryError(f"replace: the model has no module {name!r}") from None
        set_submodule(new, name, module)
    validate(new, example_input, ref, f"replace {', '.join(replacements)}", lossless_tol)
    return new
