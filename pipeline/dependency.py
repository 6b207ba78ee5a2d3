"""What a traced Torch-Pruning dependency graph says about a network: its coupled channel
groups (who produces, reads and normalises each group, and whether it may be pruned) and each
layer's :class:`LayerSpec`. :mod:`pipeline.structure` traces the model and calls these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch_pruning as tp
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .errors import UnsupportedLayer
from .spec import ChannelGroup, LayerSpec

#: autograd node names of activations that deployed engines fuse into the preceding layer
_ACTIVATIONS = {
    "ReluBackward0": "relu",
    "ReluBackward1": "relu",
    "HardtanhBackward0": "relu6",
    "HardtanhBackward1": "relu6",
    "SiluBackward0": "silu",
    "HardswishBackward0": "hardswish",
    "SigmoidBackward0": "sigmoid",
}


#: the norms that follow a layer and carry its channels (FrozenBatchNorm2d: a pretrained
#: detector backbone's, its statistics frozen as buffers)
NORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


def op_kind(m: nn.Module) -> str:
    """The latency model's op for a conv/linear module (depthwise is its own op)."""
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return "deconv"
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            return "dwconv"
        return "conv"
    raise UnsupportedLayer(f"{type(m).__name__} is not a conv or linear layer")


def out_channels(m: nn.Module) -> int:
    return int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)


def is_layer(m: nn.Module) -> bool:
    """Whether HALP times ``m`` as a layer (conv or linear)."""
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))


def _spatial(shape: tuple[int, ...], op: str) -> tuple[int, ...]:
    # linear: the dims between batch and features (tokens); conv: everything after channels
    return tuple(shape[1:-1]) if op == "linear" else tuple(shape[2:])


def _activation_after(node: Any) -> tuple[bool, str | None]:
    """(followed by BatchNorm, fused activation name) for a layer's DependencyGraph node."""
    has_bn, act = False, None
    cur = node
    if len(cur.outputs) == 1 and isinstance(cur.outputs[0].module, NORMS):
        has_bn = True
        cur = cur.outputs[0]
    if len(cur.outputs) == 1:
        nxt = cur.outputs[0]
        # the activation is an OUTPUT node when it is the network's last op
        if nxt.type in (tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.OUTPUT) and nxt.grad_fn:
            act = _ACTIVATIONS.get(nxt.grad_fn.name())
    return has_bn, act


@dataclass
class _Members:
    """The layers of one Torch-Pruning group, by role."""

    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    inputs: list[tuple[str, int, int]] = field(default_factory=list)  # (layer, first idx, n)
    reasons: list[str] = field(default_factory=list)  # why not prunable
    reaches_output: bool = False


def _members(group: Any, dg: tp.DependencyGraph, names: Mapping[nn.Module, str]) -> _Members:
    """Sort one Torch-Pruning group's dependencies into producers, consumers and norms."""
    found = _Members()
    for dep, idxs in group:
        node, mod = dep.target, dep.target.module
        produced = dg.is_out_channel_pruning_fn(dep.handler)
        consumed = is_layer(mod) and not produced
        if node.type == tp.ops.OPTYPE.OUTPUT or (not node.outputs and not consumed):
            found.reaches_output = True  # a node without successors produces the model output
        lname = names.get(mod)
        if isinstance(mod, NORMS):
            found.norms.append(lname)
        if not is_layer(mod) or lname is None:
            continue
        kind = op_kind(mod)
        if produced:
            found.producers.append(lname)
            if kind == "dwconv":
                found.consumers.append(lname)
                found.inputs.append((lname, 0, mod.out_channels))
        elif dg.is_in_channel_pruning_fn(dep.handler):
            found.consumers.append(lname)
            found.inputs.append((lname, min(idxs), len(idxs)))
        if kind == "conv" and mod.groups > 1:
            found.reasons.append(f"grouped convolution {lname} (groups={mod.groups})")
    return found


def channel_groups(tp_groups: list[Any], dg: tp.DependencyGraph,
                   modules: Mapping[str, nn.Module], ignored: set[str]
                   ) -> tuple[list[ChannelGroup], dict[str, int],
                              dict[str, list[tuple[int, int, int]]]]:
    """The spec's channel groups, each layer's output group, and each layer's input parts
    (first index, group, channels), from the Torch-Pruning groups."""
    names = {m: n for n, m in modules.items()}
    groups: list[ChannelGroup] = []
    out_group: dict[str, int] = {}
    in_parts: dict[str, list[tuple[int, int, int]]] = {}
    for gid, group in enumerate(tp_groups):
        found = _members(group, dg, names)
        channels = out_channels(group[0].dep.target.module)
        reasons = _not_prunable(found, channels, modules, ignored)
        groups.append(ChannelGroup(
            id=gid,
            channels=channels,
            producers=found.producers,
            consumers=list(dict.fromkeys(found.consumers)),
            norms=list(dict.fromkeys(found.norms)),
            prunable=not reasons,
            reason="; ".join(dict.fromkeys(reasons)) or None,
        ))
        out_group.update(dict.fromkeys(found.producers, gid))
        for lname, first, n in found.inputs:
            in_parts.setdefault(lname, []).append((first, gid, n))
    return groups, out_group, in_parts


def _not_prunable(found: _Members, channels: int, modules: Mapping[str, nn.Module],
                  ignored: set[str]) -> list[str]:
    """Why a group may not be pruned (none: it may)."""
    reasons = (["channels reach the network output"] if found.reaches_output else []) \
        + found.reasons
    hit = sorted(n for n in found.producers + found.consumers + found.norms
                 if any(n == i or n.startswith(i + ".") for i in ignored))
    if hit:
        reasons.append(f"ignored layer {hit[0]}")
    # producers holding part of the group must partition it (a concatenation); anything
    # else is a mapping Torch-Pruning got wrong, e.g. the raw input inside a concatenation
    partial = [p for p in found.producers if out_channels(modules[p]) != channels]
    if partial and sum(out_channels(modules[p]) for p in partial) != channels:
        reasons.append(f"Torch-Pruning maps {partial[0]} "
                       f"({out_channels(modules[partial[0]])} channels) into a "
                       f"{channels}-channel group")
    return reasons


def layer_spec(
    lname: str,
    mod: nn.Module,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    dg: tp.DependencyGraph,
    batch: int,
    out_gid: int | None,
    parts: list[tuple[int, int, int]],
    groups: list[ChannelGroup],
) -> LayerSpec:
    """One layer: geometry from the module, shapes from the forward pass, inputs from groups."""
    kind = op_kind(mod)
    in_shape, out_shape = shapes
    if isinstance(mod, nn.Linear):
        cin, cout = mod.in_features, mod.out_features
        geometry: dict[str, Any] = dict(kernel=(), stride=(), padding=(), dilation=(), groups=1)
    else:
        if isinstance(mod.padding, str):
            raise UnsupportedLayer(
                f"{lname} uses padding={mod.padding!r}; give explicit integer padding"
            )
        cin, cout = mod.in_channels, mod.out_channels
        geometry = dict(kernel=tuple(mod.kernel_size), stride=tuple(mod.stride),
                        padding=tuple(mod.padding), dilation=tuple(mod.dilation),
                        groups=mod.groups)
        if kind == "deconv":
            geometry["output_padding"] = tuple(mod.output_padding)
    node = dg.module2node.get(mod)
    has_bn, act = _activation_after(node) if node is not None else (False, None)

    # input channel sources, in channel order; channels no group owns come from the input
    sources: list[tuple[int | None, int]] = []
    expand = 1
    parts = sorted(parts)
    covered = sum(n for _, _, n in parts)
    if parts:
        group_channels = sum(groups[g].channels for _, g, _ in parts)
        if covered == cin and group_channels and cin % group_channels == 0:
            expand = cin // group_channels
        sources = [(g, groups[g].channels if expand > 1 else n) for _, g, n in parts]
        if covered < cin and expand == 1:
            sources.append((None, cin - covered))
    else:
        sources = [(None, cin)]
    # channels of non-prunable groups never change: the latency model sees them as fixed
    sources = [(g if g is not None and groups[g].prunable else None, n) for g, n in sources]
    in_group = sources[0][0] if len(sources) == 1 else None
    if out_gid is not None and not groups[out_gid].prunable:
        out_gid = None
    spec = LayerSpec(
        name=lname, op=kind, **geometry,
        in_hw=_spatial(in_shape, kind), out_hw=_spatial(out_shape, kind),
        cin=cin, cout=cout, in_group=in_group, out_group=out_gid, batch=batch,
        bias=bool(getattr(mod, "bias", None) is not None or has_bn), act=act,
        in_sources=sources, in_expand=expand,
        params=sum(p.numel() for p in mod.parameters(recurse=False)),
    )
    spec.macs = spec.macs_at(cin, cout)
    return spec
