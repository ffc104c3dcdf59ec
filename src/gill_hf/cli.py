"""The ``gill-hf`` command line: one sub-command per module in ``gill_hf.commands``."""

import argparse
import importlib
import sys

# Each module defines ``register(subparsers)`` which adds its sub-command with ``set_defaults(func=...)``.
COMMAND_MODULES = (
    "gill_hf.commands.tiny_backbones",
    "gill_hf.commands.count_params",
    "gill_hf.commands.quickstart",
    "gill_hf.commands.generate",
    "gill_hf.commands.precompute_targets",
    "gill_hf.commands.train",
    "gill_hf.commands.convert_original",
    "gill_hf.commands.evaluate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gill-hf", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
