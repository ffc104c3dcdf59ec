"""The ``gill-hf`` command line: one sub-command per module in ``gill_hf.commands``.

Errors are one line on stderr, ``gill-hf: error: <message>``; exit status 2 for usage errors (bad options or config
fields, missing input files), 1 for failures, 130 when interrupted. ``--debug`` (or ``GILL_HF_DEBUG=1``) shows the
full traceback instead.
"""

import argparse
import importlib
import os
import sys

from .commands import UsageError

# Each module defines ``register(subparsers)`` which adds its sub-command with ``set_defaults(func=...)``.
COMMAND_MODULES = (
    "gill_hf.commands.tiny_backbones",
    "gill_hf.commands.count_params",
    "gill_hf.commands.quickstart",
    "gill_hf.commands.generate",
    "gill_hf.commands.precompute_targets",
    "gill_hf.commands.train",
    "gill_hf.commands.convert_original",
    "gill_hf.commands.convert_minigpt5",
    "gill_hf.commands.evaluate",
    "gill_hf.commands.demo",
    "gill_hf.commands.build_index",
)
# The library's documented error classes; any other exception is reported with its type name.
EXPECTED_ERRORS = (ValueError, TypeError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gill-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also GILL_HF_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def error_line(error: BaseException) -> str:
    """``gill-hf: error: <message>`` on one line (unexpected exception types are named)."""
    message = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, EXPECTED_ERRORS):
        message = f"{type(error).__name__}: {message}"
    return f"gill-hf: error: {message}"


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; returns the exit status (argparse's own: 2 for usage errors, 0 for ``--help``)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    debug = args.debug or os.environ.get("GILL_HF_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("gill-hf: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        hint = "" if isinstance(error, UsageError) else " (run with --debug for the traceback)"
        print(error_line(error) + hint, file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
