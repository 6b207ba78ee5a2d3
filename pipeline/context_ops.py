"""Context ops as data: their signature text and the tensor sizes they read and write.

Torch-free, so a network spec and a table can name and size a layer's context without tracing
anything (:mod:`pipeline.layer_context` finds the ops in a model and builds them in ONNX and
torch). An op is a plain dict, as documented there.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from typing import Any

Op = typing.Dict[str, Any]

#: the activations a layer or a context op may apply, by the names specs and tables use
ACTIVATIONS = ("relu", "relu6", "silu", "hardswish", "sigmoid", "hardsigmoid")


def describe(pre: Sequence[Op], post: Sequence[Op]) -> str:
    """A compact signature part: ``gap@7x7>`` before the layer, ``>maxpool3s2p1`` or
    ``>hardsigmoid+mul@8x8`` after it; empty without context."""
    def one(op: Op) -> str:
        if op["op"] in ("maxpool", "avgpool"):
            text = f"{op['op']}{op['kernel'][0]}s{op['stride'][0]}p{op['padding'][0]}"
            return text + ("c" if op["ceil_mode"] else "")
        if op["op"] == "mul":
            return "mul@" + "x".join(map(str, op["other_hw"]))
        return op.get("fn") or op["op"]

    before = "+".join(one(op) + "@" + "x".join(map(str, op["in_hw"])) for op in pre)
    after = "+".join(one(op) for op in post)
    return (before + ">" if before else "") + (">" + after if after else "")


def _pooled(hw: Sequence[int], op: Op) -> tuple[int, ...]:
    if op["op"] == "gap":
        return (1,) * len(hw)
    round_ = math.ceil if op["ceil_mode"] else math.floor
    return tuple(int(round_((n + 2 * p - k) / s)) + 1
                 for n, k, s, p in zip(hw, op["kernel"], op["stride"], op["padding"]))


def input_hw(pre: Sequence[Op], layer_hw: tuple[int, ...]) -> tuple[int, ...]:
    """The spatial size the first op reads: the prologue's, else the layer's own."""
    return tuple(pre[0]["in_hw"]) if pre else layer_hw


def _walk(post: Sequence[Op], out_hw: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The spatial size after each epilogue op (the layer's output size first)."""
    sizes = [tuple(out_hw)]
    for op in post:
        hw = sizes[-1]
        if op["op"] == "mul":
            hw = tuple(max(a, b) for a, b in zip(hw, op["other_hw"]))
        elif op["op"] in ("maxpool", "avgpool", "gap"):
            hw = _pooled(hw, op)
        sizes.append(hw)
    return sizes


def output_hw(post: Sequence[Op], out_hw: tuple[int, ...]) -> tuple[int, ...]:
    """The spatial size the epilogue writes."""
    return _walk(post, out_hw)[-1]


def extra_inputs(post: Sequence[Op], batch: int, channels: int,
                 out_hw: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The feature maps the epilogue's products scale, by graph input name (``r<i>``, i the
    op's index)."""
    return {f"r{i}": (batch, channels, *op["other_hw"])
            for i, op in enumerate(post) if op["op"] == "mul"}
