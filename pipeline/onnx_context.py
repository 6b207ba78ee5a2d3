"""Context ops and activations as ONNX nodes, for the single-layer graphs a table times.

Torch-free (numpy and onnx only), so the graphs can be generated on a device that has no torch
(:mod:`pipeline.device`). The ops themselves are plain dicts described in
:mod:`pipeline.context_ops`; :mod:`pipeline.layer_context` finds them in a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import NodeProto, helper

from .context_ops import Op

#: ONNX Runtime's domain for its blocked-layout (NCHWc) conversions on x86 CPUs
NCHWC_DOMAIN = "com.microsoft.nchwc"


def activation_nodes(act: str, src: str, out: str,
                     pre: str = "") -> tuple[list[NodeProto], dict[str, np.ndarray]]:
    """Nodes computing ``out = act(src)`` and the constants they need (names start with
    ``pre``)."""
    if act == "relu6":
        lo, hi = f"{pre}clip_min", f"{pre}clip_max"
        consts = {lo: np.array(0.0, np.float32), hi: np.array(6.0, np.float32)}
        return [helper.make_node("Clip", [src, lo, hi], [out])], consts
    if act == "silu":
        return [helper.make_node("Sigmoid", [src], [f"{pre}sig"]),
                helper.make_node("Mul", [src, f"{pre}sig"], [out])], {}
    if act == "hardsigmoid":  # torch's hardsigmoid: relu6(x + 3) / 6
        return [helper.make_node("HardSigmoid", [src], [out], alpha=1 / 6, beta=0.5)], {}
    op_type = {"relu": "Relu", "hardswish": "HardSwish", "sigmoid": "Sigmoid"}[act]
    return [helper.make_node(op_type, [src], [out])], {}


def onnx_nodes(ops: Sequence[Op], src: str, out: str, pre: str, *,
               blocked_products: int = 0) -> tuple[list[NodeProto], dict[str, np.ndarray]]:
    """ONNX nodes applying ``ops`` (a prologue or an epilogue) to ``src``, writing ``out``;
    products read graph inputs ``r<i>`` (:func:`pipeline.context_ops.extra_inputs`), other
    names start with ``pre``.

    ``blocked_products``: the channel count of a product's feature map when the runtime keeps
    feature maps in its blocked layout but multiplies by a per-channel scale in NCHW (ONNX
    Runtime's NCHWc on x86): the network then converts the map out of the blocked layout
    before the product and the result back into it for the next convolution, two passes over
    the whole map per squeeze-and-excitation block. The product pays both here, with the
    runtime's own conversion ops, so a table prices what the network runs.
    """
    nodes: list[NodeProto] = []
    consts: dict[str, np.ndarray] = {}
    for i, op in enumerate(ops):
        dst = out if i == len(ops) - 1 else f"{pre}ctx{i}"
        kind = op["op"]
        if kind == "act":
            more, extra = activation_nodes(op["fn"], src, dst, f"{pre}ctx{i}_")
            nodes += more
            consts.update(extra)
        elif kind == "mul":
            other = f"r{i}"
            if blocked_products:
                nodes += [helper.make_node("ReorderInput", [other], [f"{pre}ctx{i}_blocked"],
                                           domain=NCHWC_DOMAIN),
                          helper.make_node("ReorderOutput", [f"{pre}ctx{i}_blocked"],
                                           [f"{pre}ctx{i}_plain"], domain=NCHWC_DOMAIN,
                                           channels=blocked_products)]
                other = f"{pre}ctx{i}_plain"
            nodes.append(helper.make_node("Mul", [src, other], [dst]))
        elif kind == "gap":
            nodes.append(helper.make_node("GlobalAveragePool", [src], [dst]))
        else:
            attrs = dict(kernel_shape=op["kernel"], strides=op["stride"],
                         pads=list(op["padding"]) * 2, ceil_mode=int(op["ceil_mode"]))
            if kind == "avgpool":
                attrs["count_include_pad"] = int(op["count_include_pad"])
            nodes.append(helper.make_node("MaxPool" if kind == "maxpool" else "AveragePool",
                                          [src], [dst], **attrs))
        src = dst
    return nodes, consts
