"""Progress bars on a terminal, and nothing per batch in a log.

A bar redrawn with carriage returns is one line on a terminal but hundreds of lines in a file (``slimcnn demo >
demo.log`` had 757, nearly all of them batch updates), so every bar in slimcnn goes through :func:`bar`, which draws
only when stderr is a terminal. Logs get one line per epoch from the trainer and one per evaluation instead.

>>> list(bar(range(3), enabled=False))
[0, 1, 2]
"""
from __future__ import annotations

import sys
from typing import Any, Iterable


def on_terminal() -> bool:
    """True when progress bars can redraw in place (stderr is a terminal)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any):
    """A ``tqdm`` bar over ``iterable`` that draws only when ``enabled`` and on a terminal (else a silent tqdm that
    still iterates, counts and accepts ``update`` / ``set_postfix``)."""
    from tqdm import tqdm

    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=not (enabled and on_terminal()), **kwargs)


def log_line(text: str) -> None:
    """Print one line without breaking a bar that is drawn on the terminal."""
    from tqdm import tqdm

    tqdm.write(text)
