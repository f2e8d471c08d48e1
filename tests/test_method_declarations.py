"""What each method declares for the pipeline (slimcnn/methods/base.py) matches what it really takes.

A method's options are read from its ``__init__`` signature when the class is defined; what a method declares
by hand (its ``prepare`` inputs, its CLI flags) must match what it really takes; these checks say which one when
it does not.
"""
from __future__ import annotations

import inspect

import pytest

from slimcnn import methods
from slimcnn.methods.base import Method, constructor_keywords, option_help

PIPELINE_INPUTS = {"total_steps", "lr", "schedule", "train_loader", "test_loader", "val_loader", "cfg"}
NAMES = methods.list_methods() + methods.list_stacks()


def _keywords(fn) -> set[str]:
    return {k for k, p in inspect.signature(fn).parameters.items()
            if k not in ("self", "model", "example_input") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


@pytest.mark.parametrize("name", NAMES)
def test_options_are_the_constructor_keywords(name: str) -> None:
    cls = methods.method_class(name)
    taken = _keywords(cls.__init__)
    for stage in getattr(cls, "stages", ()) if "+" in name else ():  # a stack routes the rest to its stages
        taken |= methods.method_class(stage).options
    assert cls.options == taken, f"{name}: declared {sorted(cls.options ^ taken)} differ from __init__"
    own = {kw.get("dest", flag.lstrip("-").replace("-", "_")) for flag, kw in cls.cli_args}
    assert own <= cls.options and cls.targets <= cls.options


@pytest.mark.parametrize("name", NAMES)
def test_help_texts_leave_the_default_to_the_signature(name: str) -> None:
    """A default is declared once, in ``__init__``; the CLI appends it to the help (methods/base.py:
    option_help). A help text that states a default itself would drift from the code."""
    cls = methods.method_class(name)
    signature = constructor_keywords(cls)
    for flag, kw in cls.cli_args:
        dest = kw.get("dest", flag.lstrip("-").replace("-", "_"))
        default = signature[dest].default
        if default not in (None, False):
            assert "default" not in kw["help"], f"{name} {flag}: the help restates the default {default!r}"
            assert option_help(cls, dest, kw["help"]).endswith(f"(default: {default:g})" if isinstance(
                default, float) else f"(default: {default})")


def test_the_compress_help_shows_the_signature_defaults(capsys) -> None:
    from slimcnn.cli import main

    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "truncation (default: 0.9)" in text and "(default: group_l2)" in text


@pytest.mark.parametrize("name", NAMES)
def test_prepare_inputs_are_prepare_keywords(name: str) -> None:
    cls = methods.method_class(name)
    assert cls.prepare_inputs <= PIPELINE_INPUTS
    assert cls.prepare_inputs <= _keywords(cls.prepare), f"{name}: prepare does not take {cls.prepare_inputs}"
    assert PIPELINE_INPUTS & _keywords(cls.prepare) <= cls.prepare_inputs, f"{name}: undeclared prepare input"


def test_declarations_keep_the_reports_and_checks() -> None:
    """The values the pipeline used to hold in its own tables, now on the classes."""
    cls = methods.method_class
    assert {n: cls(n).finalize_key for n in NAMES if cls(n).finalize_key != "finalize"} == {
        "csgd": "merge", "trp": "decompose"}
    assert methods.methods_where(lambda c: c.segmentation) == ["l1", "dagger", "csgd", "trp"]
    assert {n: set(cls(n).layer_control) for n in NAMES if cls(n).layer_control} == {
        "l1": {"exclude", "min_keep"}, "dagger": {"exclude", "min_keep"}, "csgd": {"exclude", "min_keep"},
        "tp": {"exclude"}, "trp": {"exclude"},
        # a stack's floors bind its channel stage
        "l1+trp": {"min_keep"}, "dagger+trp": {"min_keep"}, "csgd+trp": {"min_keep"}}
    assert methods.methods_where(lambda c: "target_latency" in c.options) == ["l1", "trp"]
    assert Method.epochs_in_prepare == 0 and Method.round_to is None


def test_trp_exclude_joins_its_layer_patterns() -> None:
    """--exclude reaches TRP as a constructor option: the layer patterns the CLI used to build for it."""
    trp = methods.method_class("trp")
    assert trp(exclude=["head"]).layer_patterns == "!head,!head.*"
    assert trp(layers="layer3.*", exclude=["a"]).layer_patterns == "layer3.*,!a,!a.*"
    assert trp(layers=["x"], exclude=["a"]).layer_patterns == ["x", "!a", "!a.*"]
    assert trp().layer_patterns is None and trp(exclude=[]).layer_patterns is None


def test_cli_passes_declared_options_and_no_default_over_a_method_budget() -> None:
    """``slimcnn compress`` fills a method's declared options from its flags; the default --target-macs is not
    passed over C-SGD's own budget (--rounds), while an explicit one is (and C-SGD warns that it is unused)."""
    import argparse

    from slimcnn.commands.compress import method_kwargs

    def ns(**kw) -> argparse.Namespace:
        base = {"target_macs": None, "target_latency": None, "round_to": None, "seed": 0, "weight_decay": 5e-4,
                "mode": None, "rounds": None, "exclude": [], "layers": None, "lr": 0.01}
        return argparse.Namespace(**{**base, **kw})

    assert method_kwargs(ns(rounds=[0.5]), "csgd", 0.5) == {"rounds": [0.5], "seed": 0, "weight_decay": 5e-4}
    assert method_kwargs(ns(target_macs=0.4, rounds=[0.5]), "csgd", 0.4)["target_macs"] == 0.4
    assert method_kwargs(ns(), "l1", 0.5) == {"target_macs": 0.5}
    assert method_kwargs(ns(exclude=["head"]), "trp", 0.5) == {"target_macs": 0.5, "exclude": ["head"]}
    assert method_kwargs(ns(mode="global"), "dagger+trp", 0.5) == {"target_macs": 0.5, "mode": "global",
                                                                    "seed": 0, "exclude": []}
