"""Single-layer ONNX graphs: one LUT point is the latency of one of these on the target.

Each graph is the layer the way a deployed engine runs it: the convolution / linear op with its
bias (a conv bias or a BatchNorm folded into one) and the activation engines fuse into it. The
graphs are built directly with ``onnx.helper`` rather than exported from torch, so building a
LUT of thousands of points costs microseconds per graph, and the same weights are available to
torch (:func:`torch_layer`) for the eager backend and for equivalence tests.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from .errors import UnsupportedLayer
from .structure import LayerSpec

ACTIVATIONS = ("relu", "relu6", "silu", "hardswish", "sigmoid")
OPS = ("conv", "dwconv", "linear", "deconv")

_TORCH_ACT = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "sigmoid": nn.Sigmoid,
}


def _check(layer: LayerSpec, cin: int, cout: int) -> int:
    """Validate the layer at (cin, cout) and return its group count there."""
    if layer.op not in OPS:
        raise UnsupportedLayer(f"{layer.name}: op {layer.op!r} is not one of {', '.join(OPS)}")
    if layer.act is not None and layer.act not in ACTIVATIONS:
        raise UnsupportedLayer(
            f"{layer.name}: activation {layer.act!r} is not one of {', '.join(ACTIVATIONS)}"
        )
    if cin < 1 or cout < 1:
        raise UnsupportedLayer(f"{layer.name}: channel counts must be >= 1, got ({cin}, {cout})")
    if layer.op == "linear":
        return 1
    if len(layer.kernel) not in (1, 2, 3) or len(layer.in_hw) != len(layer.kernel):
        raise UnsupportedLayer(
            f"{layer.name}: only 1-D/2-D/3-D convolutions with matching input sizes are "
            f"supported (kernel {layer.kernel}, input {layer.in_hw})"
        )
    depthwise = layer.op == "dwconv" or (
        layer.groups > 1 and layer.groups == layer.cin == layer.cout
    )
    if depthwise and cin != cout:
        raise UnsupportedLayer(
            f"{layer.name}: a depthwise layer needs cin == cout, got ({cin}, {cout})"
        )
    groups = cout if depthwise else layer.groups
    if cin % groups or cout % groups:
        raise UnsupportedLayer(
            f"{layer.name}: groups={groups} must divide cin={cin} and cout={cout}; "
            "grouped convolutions keep their channel counts"
        )
    return groups


def _weight_shape(layer: LayerSpec, cin: int, cout: int, groups: int) -> tuple[int, ...]:
    """Torch layout: conv (cout, cin/g, *k), deconv (cin, cout/g, *k), linear (cout, cin)."""
    if layer.op == "linear":
        return (cout, cin)
    if layer.op == "deconv":
        return (cin, cout // groups, *layer.kernel)
    return (cout, cin // groups, *layer.kernel)


def layer_weights(layer: LayerSpec, cin: int, cout: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random weights (and bias when ``layer.bias``) in torch layout.

    Scaled by 1/sqrt(fan-in) so a unit-variance input gives outputs of order one: values stay
    finite in fp16 and comparisons against torch stay meaningful.
    """
    groups = _check(layer, cin, cout)
    shape = _weight_shape(layer, cin, cout, groups)
    rng = np.random.default_rng(seed)
    fan_in = cin // groups * math.prod(layer.kernel)  # kernel is () for linear
    scale = 1.0 / math.sqrt(fan_in)
    out = {"weight": (rng.standard_normal(shape) * scale).astype(np.float32)}
    if layer.bias:
        out["bias"] = (rng.standard_normal(cout) * 0.1).astype(np.float32)
    return out


def _input_shape(layer: LayerSpec, cin: int) -> tuple[int, ...]:
    if layer.op == "linear":
        return (layer.batch, *layer.in_hw, cin)
    return (layer.batch, cin, *layer.in_hw)


def layer_input(layer: LayerSpec, cin: int, seed: int = 0) -> np.ndarray:
    """A seeded standard-normal input ``x`` of the layer's shape at ``cin`` input channels."""
    rng = np.random.default_rng([seed, 1])  # independent of the weight stream of the same seed
    return rng.standard_normal(_input_shape(layer, cin)).astype(np.float32)


def _out_hw(layer: LayerSpec) -> tuple[int, ...]:
    """Spatial output size from the geometry (not trusted from ``layer.out_hw``)."""
    if layer.op == "linear":
        return tuple(layer.in_hw)
    dims = []
    for i, size in enumerate(layer.in_hw):
        k, s, p, d = layer.kernel[i], layer.stride[i], layer.padding[i], layer.dilation[i]
        if layer.op == "deconv":
            op = layer.output_padding[i] if layer.output_padding else 0
            dims.append((size - 1) * s - 2 * p + d * (k - 1) + op + 1)
        else:
            dims.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(dims)


def _output_shape(layer: LayerSpec, cout: int) -> tuple[int, ...]:
    if layer.op == "linear":
        return (layer.batch, *layer.in_hw, cout)
    return (layer.batch, cout, *_out_hw(layer))


def _main_nodes(layer: LayerSpec, groups: int, weights: dict[str, np.ndarray],
                out: str) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """The conv/linear node(s) writing ``out`` and their initializers in ONNX layout."""
    has_bias = "bias" in weights
    if layer.op == "linear" and layer.in_hw:  # token dims: Gemm only takes 2-D inputs
        inits = {"weight_t": np.ascontiguousarray(weights["weight"].T)}
        nodes = [helper.make_node("MatMul", ["x", "weight_t"], ["xw" if has_bias else out])]
        if has_bias:
            inits["bias"] = weights["bias"]
            nodes.append(helper.make_node("Add", ["xw", "bias"], [out]))
        return nodes, inits
    inputs = ["x", *weights]  # "weight", then "bias" when present
    if layer.op == "linear":
        return [helper.make_node("Gemm", inputs, [out], transB=1)], weights
    attrs = dict(
        kernel_shape=list(layer.kernel),
        strides=list(layer.stride),
        pads=list(layer.padding) * 2,
        dilations=list(layer.dilation),
        group=groups,
    )
    if layer.op == "deconv" and any(layer.output_padding):
        attrs["output_padding"] = list(layer.output_padding)
    op_type = "ConvTranspose" if layer.op == "deconv" else "Conv"
    return [helper.make_node(op_type, inputs, [out], **attrs)], weights


def _activation_nodes(act: str, src: str,
                      out: str) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """Nodes computing ``out = act(src)`` and the constants they need."""
    if act == "relu6":
        consts = {"clip_min": np.array(0.0, np.float32), "clip_max": np.array(6.0, np.float32)}
        return [helper.make_node("Clip", [src, "clip_min", "clip_max"], [out])], consts
    if act == "silu":
        return [helper.make_node("Sigmoid", [src], ["sig"]),
                helper.make_node("Mul", [src, "sig"], [out])], {}
    op_type = {"relu": "Relu", "hardswish": "HardSwish", "sigmoid": "Sigmoid"}[act]
    return [helper.make_node(op_type, [src], [out])], {}


def layer_model(layer: LayerSpec, cin: int, cout: int, *, seed: int = 0,
                opset: int = 17) -> onnx.ModelProto:
    """The layer at (cin, cout) as a single-layer ONNX model: input ``x``, output ``y``.

    Includes the bias when ``layer.bias`` and ``layer.act`` fused after it. The IR version is
    the lowest that carries ``opset``, so older runtimes (JetPack's ONNX Runtime / TensorRT
    parser) load it too.
    """
    groups = _check(layer, cin, cout)
    nodes, inits = _main_nodes(layer, groups, layer_weights(layer, cin, cout, seed),
                               "z" if layer.act else "y")
    if layer.act:
        act_nodes, consts = _activation_nodes(layer.act, "z", "y")
        nodes += act_nodes
        inits = {**inits, **consts}
    graph = helper.make_graph(
        nodes,
        f"halp_{layer.op}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(_input_shape(layer, cin)))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(_output_shape(layer, cout)))],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="halp-pipeline",
                             ir_version=helper.find_min_ir_version_for(opsets))


def _torch_core(layer: LayerSpec, cin: int, cout: int, groups: int) -> nn.Module:
    bias = layer.bias
    if layer.op == "linear":
        return nn.Linear(cin, cout, bias=bias)
    nd = len(layer.kernel)
    common = dict(kernel_size=layer.kernel, stride=layer.stride, padding=layer.padding,
                  dilation=layer.dilation, groups=groups, bias=bias)
    if layer.op == "deconv":
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1]
        return cls(cin, cout, output_padding=layer.output_padding or 0, **common)
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1](cin, cout, **common)


def torch_layer(layer: LayerSpec, cin: int, cout: int, seed: int = 0) -> nn.Module:
    """The torch equivalent of :func:`layer_model` with the same weights, in eval mode."""
    groups = _check(layer, cin, cout)
    core = _torch_core(layer, cin, cout, groups)
    weights = layer_weights(layer, cin, cout, seed)
    with torch.no_grad():
        core.weight.copy_(torch.from_numpy(weights["weight"]))
        if "bias" in weights:
            core.bias.copy_(torch.from_numpy(weights["bias"]))
    act = [_TORCH_ACT[layer.act]()] if layer.act else []
    return nn.Sequential(core, *act).eval()
