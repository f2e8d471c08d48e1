"""Checks every surgery runs on its result before handing it back."""
from __future__ import annotations

import torch
from torch import nn


class SurgeryError(RuntimeError):
    """A surgery would return a broken model. The caller's model is untouched."""


def first_output(out) -> torch.Tensor:
    from ..outputs import final_output  # the library's one rule for reading a model's prediction

    return final_output(out)


@torch.no_grad()
def reference_output(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return first_output(model(example_input)).detach().clone()
    finally:
        model.train(was)


@torch.no_grad()
def validate(model: nn.Module, example_input: torch.Tensor, reference: torch.Tensor, what: str,
             lossless_tol: float | None = None) -> torch.Tensor:
    """Forward ``example_input``; the output must have ``reference``'s shape and, if ``lossless_tol`` is set,
    match it within that max abs difference. Raises :class:`SurgeryError` naming ``what`` (and the module that
    failed, if the forward pass broke) otherwise. Returns the output."""
    was = model.training
    model.eval()
    stack: list[str] = []
    failed: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def pre(mod, inputs):
        stack.append(names.get(mod, "?"))

    def post(mod, inputs, output):
        stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        out = first_output(model(example_input))
    except Exception as e:
        failed = stack[-1:]  # the innermost module running when it broke
        where = f" at {failed[0] or '(model)'} ({type(model.get_submodule(failed[0])).__name__})" if failed else ""
        raise SurgeryError(f"{what}: the model no longer runs forward{where}: {type(e).__name__}: {e}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if out.shape != reference.shape:
        raise SurgeryError(f"{what}: output shape changed from {tuple(reference.shape)} to {tuple(out.shape)}")
    if lossless_tol is not None:
        diff = (out - reference).abs().max().item()
        if not diff <= lossless_tol:
            raise SurgeryError(f"{what}: should be lossless but outputs differ by {diff:.3g} (tolerance {lossless_tol:g})")
    return out.detach()
