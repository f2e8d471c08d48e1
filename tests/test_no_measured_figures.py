"""Docstrings and help texts state behaviour, not measurements: a top-1 figure typed there goes stale as soon as
code moves (measured figures live in benchmarks/results/*.json and docs/results.md, written from it). Doctest
examples are exempt: their numbers are inputs and outputs of the example, checked when the doctests run."""
from __future__ import annotations

import ast
import doctest
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slimcnn"
FIGURE = re.compile(r"top-?1\W{0,3}[^.\n]{0,40}?\b\d{2}\.\d{1,2}\b|\b\d{2}\.\d{1,2}\b[^.\n]{0,20}top-?1", re.I)


def _prose(text: str) -> str:
    """``text`` without its doctest examples (and their expected output)."""
    return "".join(part for part in doctest.DocTestParser().parse(text) if isinstance(part, str))


def _texts(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield f"docstring of {getattr(node, 'name', path.name)}", _prose(doc)
        if isinstance(node, ast.keyword) and node.arg == "help":
            try:
                yield "help text", ast.literal_eval(node.value)
            except ValueError:  # an f-string: its literal parts
                yield "help text", "".join(v.value for v in ast.walk(node.value)
                                           if isinstance(v, ast.Constant) and isinstance(v.value, str))


def test_no_top1_figure_in_docstrings_or_help_texts():
    found = [f"{path.relative_to(PACKAGE.parent)} ({where}): {m.group(0)!r}"
             for path in sorted(PACKAGE.rglob("*.py")) for where, text in _texts(path)
             for m in FIGURE.finditer(text)]
    assert not found, "measured figures in the package's prose: " + "; ".join(found)


def test_the_check_finds_a_typed_figure():
    assert FIGURE.search("the stack reached top-1 84.78 at 0.5 MACs") and FIGURE.search("82.4 top-1 plain")
    assert not FIGURE.search(_prose(">>> best(87.0)\n'top-1 87.00'\n"))
