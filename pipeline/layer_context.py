"""The ops a deployed engine runs around a layer, priced with it: what follows it (activation,
pooling, squeeze-and-excitation scale) and what precedes it (global pooling).

A latency table that prices only convolutions leaves the rest of the network to a constant, yet
those ops scale with the channels the pruner removes: a pooling or an SE scale reads every
channel. So each layer carries its context, found by tracing the model with ``torch.fx``, and a
table point times the layer together with it. Every context op keeps the channel count: ops
after a layer work on its output channels, ops before it on its input channels. A residual add
is not one of them: engines fuse it into the convolution that writes it (see :func:`_binary`).

Context ops are plain dicts (JSON in network specs and tables):
``{"op": "mul", "other_hw": [H, W]}`` (a broadcast product with a tensor of that spatial size),
``{"op": "act", "fn": NAME}``, ``{"op": "maxpool" | "avgpool", "kernel", "stride", "padding",
"ceil_mode"}``, ``{"op": "gap"}`` (global average pooling); a prologue op also records
``in_hw``, the spatial size it reads.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .context_ops import Op
from .spec import call_name

log = logging.getLogger(__name__)

#: activations an engine applies as it writes a tensor (module type -> name)
ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
               nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}
#: the same activations by name, as torch modules build them
TORCH_ACTIVATIONS = {name: module for module, name in ACT_MODULES.items()}
ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu",
                 F.hardswish: "hardswish", torch.sigmoid: "sigmoid",
                 F.hardsigmoid: "hardsigmoid"}
_PASS_MODULES = (nn.Dropout, nn.Identity, nn.Flatten, nn.modules.batchnorm._BatchNorm)
_MUL = (operator.mul, operator.imul, torch.mul)


# ---------------------------------------------------------------------------------------------
# Finding the context in a model


def find(model: nn.Module, example_input: torch.Tensor,
         layers: Mapping[str, str | None]) -> dict[str, tuple[list[Op], list[Op]]]:
    """(prologue, epilogue) per layer name in ``layers`` (name -> the activation already fused
    into the layer, which the epilogue does not repeat). Empty where the model cannot be traced
    by ``torch.fx``: those ops are then left to the table's calibration constant, as logged."""
    try:
        graph = fx.symbolic_trace(model)
        ShapeProp(graph).propagate(example_input)
    except Exception as exc:  # tracing fails in many ways (TraceError, TypeError, ...)
        log.info("no layer context for %s: torch.fx cannot trace it (%s); pooling and "
                 "elementwise ops are left to the calibration constant",
                 type(model).__name__, exc)
        return {name: ([], []) for name in layers}
    calls: Counter[str] = Counter()
    nodes = {}
    for n in graph.graph.nodes:  # in execution order: a shared module's k-th call is layer #k
        if n.op == "call_module":
            name = call_name(n.target, calls[n.target])
            calls[n.target] += 1
            if name in layers:
                nodes[name] = n
    order = {n: i for i, n in enumerate(graph.graph.nodes)}
    chains = {name: _after(graph, node, layers[name]) for name, node in nodes.items()}
    _resolve_shared(chains, {name: order[node] for name, node in nodes.items()})
    claimed = {n for chain in chains.values() for n, _ in chain}
    out = {name: ([], []) for name in layers}
    for name, node in nodes.items():
        out[name] = (_before(graph, node, claimed), [op for _, op in chains[name]])
    return out


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for a traced node (None for a non-tensor)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _module(graph: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return graph.get_submodule(node.target) if node.op == "call_module" else None


def _is_pass(graph: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that move no data in a deployed engine (BatchNorm is folded into the layer)."""
    if isinstance(_module(graph, node), _PASS_MODULES):
        return True
    if node.op == "call_function":
        return node.target in (torch.flatten, F.dropout) or \
            getattr(node.target, "__name__", "") == "stochastic_depth"
    return node.op == "call_method" and node.target in ("flatten", "view", "reshape")


def _act(graph: fx.GraphModule, node: fx.Node) -> str | None:
    module = _module(graph, node)
    if module is not None:
        return ACT_MODULES.get(type(module))
    if node.op == "call_function":
        return ACT_FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target in ("relu", "sigmoid"):
        return node.target
    return None


def _pool(graph: fx.GraphModule, node: fx.Node) -> Op | None:
    """A 2-D pooling op as a context op (global average pooling from several spellings)."""
    shape = tensor_shape(node.args[0]) if node.args else None
    if shape is None or len(shape) != 4:
        return None
    module = _module(graph, node)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        if isinstance(module, nn.MaxPool2d) and _pair(module.dilation) != [1, 1]:
            return None
        op = {"op": "maxpool" if isinstance(module, nn.MaxPool2d) else "avgpool",
              "kernel": _pair(module.kernel_size), "stride": _pair(module.stride),
              "padding": _pair(module.padding), "ceil_mode": bool(module.ceil_mode)}
        if isinstance(module, nn.AvgPool2d):
            if module.divisor_override is not None:
                return None
            op["count_include_pad"] = bool(module.count_include_pad)
        return op
    out = tensor_shape(node)
    if isinstance(module, nn.AdaptiveAvgPool2d) or (
            node.op == "call_function" and node.target is F.adaptive_avg_pool2d):
        return {"op": "gap"} if out is not None and out[-2:] == (1, 1) else None
    if (node.op == "call_method" and node.target == "mean") or \
            (node.op == "call_function" and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = tuple(d % 4 for d in (dims if isinstance(dims, (tuple, list)) else [dims]))
        return {"op": "gap"} if sorted(dims) == [2, 3] else None
    return None


def _pair(value: Any) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value), int(value)]


def _binary(node: fx.Node, src: fx.Node) -> Op | None:
    """A broadcast product of ``src`` with another tensor of the graph (a squeeze-and-excitation
    scale). A residual add ends the context instead: ONNX Runtime and TensorRT fuse it, and the
    activation after it, into the convolution that writes it, where it costs one more read; as
    a separate op on a graph input it would be charged a layout conversion and a kernel that
    the network does not run (measured: 37% over the network at two threads)."""
    if node.op != "call_function" or len(node.args) != 2 or node.kwargs:
        return None
    other = node.args[1] if node.args[0] is src else node.args[0]
    mine, theirs, out = tensor_shape(src), tensor_shape(other), tensor_shape(node)
    if theirs is None or mine is None or out is None or len(mine) != len(theirs):
        return None
    if node.target in _MUL and len(out) == 4 and mine[:2] == theirs[:2]:
        return {"op": "mul", "other_hw": list(theirs[2:])}
    return None


def _after(graph: fx.GraphModule, layer: fx.Node, fused_act: str | None) -> list[tuple]:
    """(fx node, op) from the layer forward while each tensor has exactly one reader."""
    chain: list[tuple[fx.Node, Op]] = []
    node, skip_act = layer, fused_act is not None
    while len(node.users) == 1:
        prev, node = node, next(iter(node.users))
        if isinstance(_module(graph, node), (nn.modules.conv._ConvNd, nn.Linear)):
            break
        if _is_pass(graph, node):
            continue
        act = _act(graph, node)
        if act is not None and skip_act:  # the layer's own activation, priced with it already
            skip_act = False
            continue
        skip_act = False
        op = {"op": "act", "fn": act} if act is not None else (
            _pool(graph, node) or _binary(node, prev))
        if op is None:
            break
        chain.append((node, op))
    return chain


def _resolve_shared(chains: dict[str, list[tuple]], order: Mapping[str, int]) -> None:
    """An op reached from several layers' chains belongs to the layer that runs last, whose
    other inputs are then ready; the earlier layers' chains stop before it, so every op is
    priced once."""
    owner: dict[fx.Node, str] = {}
    for name, chain in chains.items():
        for node, _ in chain:
            if node not in owner or order[name] > order[owner[node]]:
                owner[node] = name
    for name, chain in chains.items():
        for i, (node, _) in enumerate(chain):
            if owner[node] != name:
                del chain[i:]
                break


def _before(graph: fx.GraphModule, layer: fx.Node, claimed: set) -> list[Op]:
    """Pooling that only feeds this layer, walking back from its input (squeeze-and-excitation
    pools before its first 1x1 convolution; a classifier's pooling before its linear layer
    when no convolution's epilogue took it)."""
    ops: list[Op] = []
    node = layer.args[0] if layer.args else None
    while isinstance(node, fx.Node) and len(node.users) == 1 and node not in claimed:
        if _is_pass(graph, node):
            node = node.args[0] if node.args else None
            continue
        op = _pool(graph, node)
        if op is None:
            break
        ops.insert(0, {**op, "in_hw": list(tensor_shape(node.args[0])[2:])})
        node = node.args[0]
    return ops


# ---------------------------------------------------------------------------------------------
# Describing, shaping and building the context


class TorchOps(nn.Module):
    """``ops`` in eager torch; the feature maps the products scale are fixed buffers
    (``others``, op index -> tensor), so the module takes the layer's tensor alone."""

    def __init__(self, ops: Sequence[Op], others: Mapping[int, torch.Tensor]):
        super().__init__()
        self.ops = [dict(op) for op in ops]
        self.acts = nn.ModuleDict({str(i): TORCH_ACTIVATIONS[op["fn"]]()
                                   for i, op in enumerate(ops) if op["op"] == "act"})
        for i, tensor in others.items():
            self.register_buffer(f"r{i}", tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, op in enumerate(self.ops):
            kind = op["op"]
            if kind == "act":
                x = self.acts[str(i)](x)
            elif kind == "mul":
                x = x * getattr(self, f"r{i}")
            elif kind == "gap":
                x = F.adaptive_avg_pool2d(x, 1)
            elif kind == "maxpool":
                x = F.max_pool2d(x, op["kernel"], op["stride"], op["padding"],
                                 ceil_mode=op["ceil_mode"])
            else:
                x = F.avg_pool2d(x, op["kernel"], op["stride"], op["padding"],
                                 ceil_mode=op["ceil_mode"],
                                 count_include_pad=op["count_include_pad"])
        return x

