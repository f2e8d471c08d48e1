"""The ``slimcnn`` command. Each subcommand lives in ``slimcnn/commands/<name>.py`` and provides
``add_parser(subparsers)`` (which sets ``func``) so that commands stay independent of each other."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["demo", "profile", "eval", "train", "compress", "export", "bench"]


class UserError(Exception):
    """An error the user can fix (bad path, bad option): printed as one line, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__  # noqa: F401

    parser = argparse.ArgumentParser(prog="slimcnn", description="Make trained CNNs smaller and faster.")
    parser.add_argument("--version", action="version", version=f"slimcnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"slimcnn.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"slimcnn.commands.{name}":
                continue  # not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .data import DataError
    from .graph.validate import SurgeryError
    from .models import CheckpointError

    try:
        result = args.func(args)
    except (UserError, DataError, CheckpointError, SurgeryError, FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"slimcnn {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
