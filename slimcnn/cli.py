"""The ``slimcnn`` command. Each subcommand lives in ``slimcnn/commands/<name>.py`` and provides
``add_parser(subparsers)`` (which sets ``func``) so that commands stay independent of each other.

Options every command shares (``--threads``) are added here, once, after the commands have built their parsers,
and applied here before the command runs: a command never sets torch's thread count itself."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["demo", "models", "profile", "eval", "train", "compress", "export", "bench"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__  # noqa: F401

    parser = argparse.ArgumentParser(
        prog="slimcnn", description="Make trained CNNs smaller and faster.",
        epilog="`slimcnn COMMAND --help` shows a command's options; every command also takes --threads. "
               "`slimcnn models` lists the model names the commands accept.")
    parser.add_argument("--version", action="version", version=f"slimcnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"slimcnn.commands.{name}").add_parser(sub)
    from .commands.common import add_threads_arg

    for command in sub.choices.values():
        add_threads_arg(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if hasattr(sys.stdout, "reconfigure") and not sys.stdout.isatty():
        # a log file gets each line when it is printed (an epoch's line must not wait in a buffer for the next)
        sys.stdout.reconfigure(line_buffering=True)
    from .commands.common import UserError, torch_threads
    from .data import DataError
    from .graph.validate import SurgeryError
    from .models import CheckpointError

    try:
        with torch_threads(args.threads):
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
