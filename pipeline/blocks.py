"""Residual blocks, found in the traced graph: which blocks depth pruning may remove (MDP).

A residual block is a module whose traced ops compute ``act(skip(x) + branch(x))``: one add of
two same-shape operands inside the module, which has one input ``x``, and whose output is that
add or one activation of it. It is removable when the skip is ``x`` itself. Nothing
is read from class names, so torchvision's BasicBlock, Bottleneck, InvertedResidual and MBConv
and a user's own blocks are found alike.

What a removed block becomes: the identity. Zeroing only the branch's internal channels would
leave the branch's last BatchNorm adding its shift (a constant per channel), so removal means
the branch outputs exactly zero (MDP's depth pruning) and the block computes ``act(x)``. That
is ``x`` itself when there is no activation after the add, or when the activation is ReLU (or
ReLU6) and ``x`` is already that activation's output (through max-pooling at most), as in a
ResNet; a block whose activation would change ``x`` is not removable, nor one whose skip has
layers of its own (a downsampling block). The planner prices a removed block at zero, and
:func:`pipeline.slim.slim` replaces it by ``nn.Identity``: exactly what was priced.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .layer_context import ACT_FUNCTIONS, ACT_MODULES, tensor_shape
from .spec import NetworkSpec, ResidualBlock

log = logging.getLogger(__name__)

_ADDS = (operator.add, operator.iadd, torch.add)
#: activations f with f(f(x)) == f(x): the block's act(x) is x when x is f's output already
_IDEMPOTENT = ("relu", "relu6")


def residual_blocks(model: nn.Module, example_input: torch.Tensor,
                    spec: NetworkSpec) -> list[ResidualBlock]:
    """The residual blocks of ``model`` (traced by ``torch.fx`` on ``example_input`` in eval
    mode), with the channel groups and layers of ``spec`` inside each; none where the model
    cannot be traced."""
    was_training = model.training
    try:
        graph = fx.symbolic_trace(model.eval())
        with torch.no_grad():
            ShapeProp(graph).propagate(example_input)
    except Exception as exc:  # tracing fails in many ways (TraceError, TypeError, ...)
        log.info("no residual blocks for %s: torch.fx cannot trace it (%s)",
                 type(model).__name__, exc)
        return []
    finally:
        model.train(was_training)
    modules = dict(graph.named_modules())
    blocks = []
    for node in graph.graph.nodes:
        if not _is_add(node):
            continue
        owner = next(reversed(node.meta.get("nn_module_stack") or {}), None)
        found = owner and _block(graph, modules, node, owner, spec)
        if found:  # a block has one add: no owner is found twice
            blocks.append(found)
    return blocks


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or \
        (node.op == "call_method" and node.target in ("add", "add_"))


def _inside(node: fx.Node, owner: str) -> bool:
    return owner in (node.meta.get("nn_module_stack") or {})


def _act(modules: dict[str, nn.Module], node: fx.Node) -> str | None:
    if node.op == "call_module":
        return ACT_MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        return ACT_FUNCTIONS.get(node.target)
    return None


def _block(graph: fx.GraphModule, modules: dict[str, nn.Module], add: fx.Node, owner: str,
           spec: NetworkSpec) -> ResidualBlock | None:
    """The block ``owner`` around ``add``, or None when ``owner`` is not a residual block."""
    nodes = [n for n in graph.graph.nodes if _inside(n, owner)]
    inputs = {a for n in nodes for a in n.all_input_nodes if not _inside(a, owner)}
    outputs = [n for n in nodes if any(not _inside(u, owner) for u in n.users)]
    adds = [n for n in nodes if _is_add(n)]
    operands = [a for a in add.args if isinstance(a, fx.Node)]
    if len(inputs) != 1 or len(outputs) != 1 or adds != [add] or len(operands) != 2:
        return None
    (x,), out = inputs, outputs[0]
    act = None
    if out is not add:
        act = _act(modules, out)
        if act is None or out.all_input_nodes != [add] or len(add.users) != 1:
            return None
    shapes = {tensor_shape(n) for n in (add, *operands)}
    if len(shapes) != 1 or None in shapes:
        return None  # a broadcast: not a residual sum
    prefix = owner + "."
    layers = [la.name for la in spec.layers if la.name.startswith(prefix)]
    groups = [g.id for g in spec.groups
              if g.layers and all(name.startswith(prefix) for name in g.layers)]
    reason = _why_not(modules, x, operands, act, layers, groups, spec)
    return ResidualBlock(owner, layers, groups, act, reason is None, reason)


def _why_not(modules: dict[str, nn.Module], x: fx.Node, operands: list[fx.Node],
             act: str | None, layers: list[str], groups: list[int],
             spec: NetworkSpec) -> str | None:
    """Why zeroing the block's branch does not leave the identity (None: it does)."""
    if x not in operands:
        return "the skip path has layers of its own (e.g. a downsampling convolution)"
    if act is not None and not (act in _IDEMPOTENT and _made_by(modules, x, act)):
        return f"{act} after the add would change the block's input"
    if not groups:
        return "no channel group lives inside the block"
    sizable = set(spec.sizable_groups())
    inner = [g for g in groups if g not in sizable]
    if inner:
        group = spec.group(inner[0])
        return f"inner group {inner[0]} cannot be pruned ({group.reason or 'partly held'})"
    touching = {la.name for la in spec.layers if la.out_group in groups
                or any(g in groups for g, _ in la.in_sources)}
    alone = [name for name in layers if name not in touching]
    if alone:
        return f"layer {alone[0]} touches no inner channel group"
    return None


def _made_by(modules: dict[str, nn.Module], node: fx.Node, act: str) -> bool:
    """Whether ``node`` is the output of activation ``act`` (through max-pooling, which keeps
    its range)."""
    while node.op == "call_module" and isinstance(modules[node.target], nn.modules.pooling
                                                  ._MaxPoolNd):
        node = node.all_input_nodes[0]
    return _act(modules, node) == act
