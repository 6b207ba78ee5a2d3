"""The ``halp`` command: a dispatcher over the subcommand modules in ``pipeline.commands``.

Building the parser imports no torch: every subcommand checks its arguments before the library
loads, so a mistyped flag costs a fraction of a second rather than a baseline's training.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import HalpError

#: each module defines ``register(subparsers)`` that adds its parser with ``func=run``
COMMANDS = ["analyze", "lut", "engine", "verify", "prune"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="halp",
        description="Latency-aware structural pruning (HALP) for TensorRT / ONNX Runtime.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"pipeline.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse and check the arguments (torch-free, see :mod:`pipeline.commands.common`), then
    run the command; a HalpError becomes its message and exit status 2, like a bad flag."""
    return run_parsed(build_parser(), argv, lambda args: f"halp {args.command}")


def run_parsed(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               name: Callable[[argparse.Namespace], str]) -> int:
    """The exit status of ``args.func(args)`` for the arguments ``parser`` reads from
    ``argv``: a refused argument (argparse explained it) or a HalpError is 2, with the error
    after the command's ``name``; Ctrl-C is 130, saying ``interrupted``. Every entry point
    (`halp`, `python -m pipeline.device`) runs its command so."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a refused argument argparse already explained (2)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False)
                        else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except HalpError as exc:
        print(f"{name(args)}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name(args)}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
