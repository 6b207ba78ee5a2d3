"""The single-layer graphs of :mod:`pipeline.onnx_layers` in eager torch, with the same weights:
what the torch backend times, and the reference the ONNX graphs are tested against.

Kept apart from :mod:`pipeline.onnx_layers` so that generating the ONNX graphs needs no torch
(a Jetson building a table with TensorRT has none, :mod:`pipeline.device`).
"""

from __future__ import annotations

import torch
from torch import nn

from . import layer_context
from .onnx_layers import groups_at, layer_inputs, layer_weights
from .spec import LayerSpec


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
    groups = groups_at(layer, cin, cout)
    core = _torch_core(layer, cin, cout, groups)
    weights = layer_weights(layer, cin, cout, seed)
    with torch.no_grad():
        core.weight.copy_(torch.from_numpy(weights["weight"]))
        if "bias" in weights:
            core.bias.copy_(torch.from_numpy(weights["bias"]))
    act = [layer_context.TORCH_ACTIVATIONS[layer.act]()] if layer.act else []
    before = [layer_context.TorchOps(layer.pre, {})] if layer.pre else []
    if layer.pre and layer.op == "linear":
        before.append(nn.Flatten())
    after = []
    if layer.post:
        inputs = layer_inputs(layer, cin, cout, seed)
        others = {int(k[1:]): torch.from_numpy(v) for k, v in inputs.items() if k != "x"}
        after = [layer_context.TorchOps(layer.post, others)]
    return nn.Sequential(*before, core, *act, *after).eval()
