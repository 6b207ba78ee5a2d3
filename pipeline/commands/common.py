"""Argument groups, argument checks and output helpers shared by the subcommands.

Command modules import only this, :mod:`pipeline.config` and other torch-free modules at their
top: every flag is parsed and checked (numbers, shapes, files) before torch, torchvision or a
runtime loads, so a bad argument fails in a fraction of a second. The library is imported by
each command's ``run``, after its arguments passed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..config import (
    BACKENDS,
    PRECISIONS,
    Check,
    at_least,
    file_path,
    folder_path,
    model_spec,
    parse_shape,
    readable_file,
)
from ..errors import HalpError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..backends import Backend


def checked(parse: Callable[[str], Any], check: Check | None = None) -> Callable[[str], Any]:
    """An argparse ``type``: parse the flag's text, then refuse a bad value with the check's own
    message (argparse prints it after the flag's name and exits with status 2)."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
            if check is not None and value is not None:
                check(value)
        except HalpError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {_KINDS.get(parse, 'valid value')}") from None
        return value

    return convert


_KINDS: dict[Callable[[str], Any], str] = {int: "whole number", float: "number"}

#: argparse types for the common kinds of flag
POSITIVE_INT = checked(int, at_least(1))
SHAPE = checked(parse_shape)
READABLE_FILE = checked(str, readable_file)
OUTPUT_FILE = checked(str, file_path)
OUTPUT_FOLDER = checked(str, folder_path)


def add_model_args(parser: argparse.ArgumentParser, *, input_default: str | None = None) -> None:
    parser.add_argument("--model", required=True, type=checked(str, model_spec),
                        help="torchvision name (resnet50), module:callable, or a saved nn.Module")
    parser.add_argument("--input", default=input_default, required=input_default is None,
                        type=SHAPE, help="input shape, batch first, e.g. 1x3x224x224")
    parser.add_argument("--num-classes", type=POSITIVE_INT, default=None,
                        help="classifier width for torchvision models (default: theirs)")
    parser.add_argument("--checkpoint", default=None, type=READABLE_FILE,
                        help="weights (state_dict) to load")


def add_backend_args(parser: argparse.ArgumentParser, *, choices: Sequence[str] = BACKENDS,
                     default: str | None = None) -> None:
    parser.add_argument("--backend", choices=list(choices), default=default,
                        required=default is None, help="runtime to time and deploy with")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None,
                        help="CPU threads for onnxruntime/torch (default: physical cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="device for onnxruntime/torch (default: cpu)")


def backend_from_args(args: argparse.Namespace) -> Backend:
    """The backend the flags name; an unavailable one (TensorRT not installed, no CUDA) is
    refused here, before any model is loaded or timed."""
    from ..backends import get_backend

    options = {k: v for k, v in (("threads", args.threads), ("device", args.device))
               if v is not None}
    return get_backend(args.backend, args.precision, **options)


def model_from_args(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    """The model (checkpoint loaded) and a random example input of the requested shape."""
    import torch

    from ..models import load_checkpoint, load_model

    model = load_model(args.model, num_classes=args.num_classes)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    return model.eval(), torch.randn(*args.input)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_num(row[i]) for row in rows) if rows else False
               for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def human(n: float) -> str:
    """1234567 → '1.23M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
