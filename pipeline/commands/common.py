"""Argument groups and output helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..models import load_checkpoint, load_model, parse_shape

if TYPE_CHECKING:
    from ..backends import Backend


def add_model_args(parser: argparse.ArgumentParser, *, input_default: str | None = None) -> None:
    parser.add_argument("--model", required=True,
                        help="torchvision name (resnet50), module:callable, or a saved nn.Module")
    parser.add_argument("--input", default=input_default, required=input_default is None,
                        help="input shape, batch first, e.g. 1x3x224x224")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier width for torchvision models (default: theirs)")
    parser.add_argument("--checkpoint", default=None, help="weights (state_dict) to load")


def add_backend_args(parser: argparse.ArgumentParser, *,
                     choices: Sequence[str] = ("onnxruntime", "torch", "tensorrt"),
                     default: str | None = None) -> None:
    parser.add_argument("--backend", choices=list(choices), default=default,
                        required=default is None, help="runtime to time and deploy with")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for onnxruntime/torch (default: physical cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="device for onnxruntime/torch (default: cpu)")


def backend_from_args(args: argparse.Namespace) -> Backend:
    from ..backends import get_backend  # runtimes load only for commands that time something

    options = {k: v for k, v in (("threads", args.threads), ("device", args.device))
               if v is not None}
    return get_backend(args.backend, args.precision, **options)


def model_from_args(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    """The model and a random example input of the requested shape (shape checked first)."""
    shape = parse_shape(args.input)
    model = load_model(args.model, num_classes=args.num_classes)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    return model.eval(), torch.randn(*shape)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_num(row[i]) for row in rows) if rows else False
               for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

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
