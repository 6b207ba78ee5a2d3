"""What the latency model knows about a network: its layers, their geometry and the coupled
channel groups the pruner may shrink.

Plain data, no torch: a table, the planner and the knapsack read a spec without the model it came
from (:func:`pipeline.structure.analyze` builds one from a model).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import context_ops
from .errors import StructureError
from .kinds import OpKind

SPEC_FORMAT = 1
#: joins a module's name and the index of a later call to it (see :func:`call_name`)
CALL = "#"


def call_name(module: str, call: int) -> str:
    """The layer name of a module's ``call``-th run in one forward pass.

    A module run several times per pass (a detector head shared across feature levels) is one
    layer per call, each priced at its own input size, all of them pruned together as the
    module's channels are: ``head.conv``, ``head.conv#1``, ``head.conv#2``...
    """
    return module if call == 0 else f"{module}{CALL}{call}"


@dataclass
class LayerSpec:
    """One convolution or linear layer as the latency model sees it.

    ``in_sources`` lists where the input channels come from, in order: ``(group id, channels)``
    per coupled group, ``(None, channels)`` for channels no group owns (the network input).
    ``in_group`` is that group when it is the only source, else None. Group ids are None wherever
    the channels are not prunable (network input, classifier output, ignored layers), so a
    layer's ``in_group``/``out_group`` name exactly what the pruner may change.
    ``in_expand`` is >1 when a flatten feeds a linear layer: each channel becomes that many
    features, so ``cin == in_expand * sum(channels)``.
    """

    name: str
    op: OpKind
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    in_hw: tuple[int, ...]
    out_hw: tuple[int, ...]
    cin: int
    cout: int
    in_group: int | None
    out_group: int | None
    batch: int = 1
    bias: bool = False
    act: str | None = None
    output_padding: tuple[int, ...] = ()
    in_sources: list[tuple[int | None, int]] = field(default_factory=list)
    in_expand: int = 1
    macs: int = 0
    params: int = 0
    #: ops the engine runs with the layer, priced with it (:mod:`pipeline.layer_context`):
    #: pooling before it (on its input channels), activations/SE products/pooling after it
    pre: list[dict[str, Any]] = field(default_factory=list)
    post: list[dict[str, Any]] = field(default_factory=list)

    @property
    def signature(self) -> str:
        """Everything but the channel counts: layers with equal signatures share LUT entries."""
        parts = [
            self.op,
            "k" + "x".join(map(str, self.kernel)),
            "s" + "x".join(map(str, self.stride)),
            "p" + "x".join(map(str, self.padding)),
            "d" + "x".join(map(str, self.dilation)),
            "hw" + ("x".join(map(str, self.in_hw)) or "-"),
            f"b{self.batch}",
            "bias" if self.bias else "nobias",
            self.act or "noact",
        ]
        if self.op == OpKind.CONV and self.groups > 1:
            parts.append(f"g{self.groups}")
        if self.output_padding and any(self.output_padding):
            parts.append("op" + "x".join(map(str, self.output_padding)))
        if self.pre or self.post:
            parts.append(context_ops.describe(self.pre, self.post))
        return "|".join(parts)

    def dims(self, counts: Mapping[int, int] | None = None) -> tuple[int, int]:
        """(cin, cout) of this layer when each group keeps ``counts[group]`` channels."""
        counts = counts or {}
        cin = self.in_expand * sum(
            counts.get(g, c) if g is not None else c for g, c in self.in_sources
        ) if self.in_sources else self.cin
        cout = counts.get(self.out_group, self.cout) if self.out_group is not None else self.cout
        if self.op == OpKind.DWCONV:
            cin = cout
        return cin, cout

    def params_at(self, cin: int, cout: int) -> int:
        """Weights and bias at (cin, cout): what one run streams from memory, in parameters.
        Torch- and onnx-free, so a table prices a network's working set without them."""
        k = math.prod(self.kernel) if self.kernel else 1
        if self.op == OpKind.LINEAR:
            weights = cin * cout
        elif self.op == OpKind.DWCONV or (self.groups > 1
                                          and self.groups == self.cin == self.cout):
            weights = cout * k
        else:  # conv (cout, cin/g, *k) and deconv (cin, cout/g, *k)
            weights = cin * cout // self.groups * k
        return weights + (cout if self.bias else 0)

    def macs_at(self, cin: int, cout: int) -> int:
        """Multiply-accumulates per sample at the given channel counts."""
        k = math.prod(self.kernel) if self.kernel else 1
        if self.op == OpKind.DWCONV:
            return cout * k * math.prod(self.out_hw)
        if self.op == OpKind.LINEAR:
            return cin * cout * math.prod(self.in_hw)
        if self.op == OpKind.DECONV:
            return cin * (cout // self.groups) * k * math.prod(self.in_hw)
        return cout * (cin // self.groups) * k * math.prod(self.out_hw)


@dataclass
class ChannelGroup:
    """Channels that must be pruned together (same indices in every member)."""

    id: int
    channels: int
    producers: list[str]  # layers whose output channels are these channels
    consumers: list[str]  # layers reading these channels as input
    norms: list[str]  # BatchNorm layers over these channels (for Taylor saliency)
    prunable: bool = True
    reason: str | None = None  # why not prunable

    @property
    def layers(self) -> list[str]:
        return self.producers + [c for c in self.consumers if c not in self.producers]


@dataclass
class ResidualBlock:
    """A module computing ``act(x + branch(x))`` (:mod:`pipeline.blocks` finds them).

    ``removable``: zeroing the branch leaves the identity (the skip is the block input itself,
    and ``act`` is absent or already holds on that input), so the block may be dropped whole
    when its ``groups`` (the channel groups produced and read only inside it) all go to zero;
    ``layers`` are the conv/linear layers inside it, which then cost nothing. ``reason`` says
    why a residual block is not removable.
    """

    name: str
    layers: list[str]
    groups: list[int]
    act: str | None = None
    removable: bool = True
    reason: str | None = None


@dataclass
class NetworkSpec:
    input_shape: tuple[int, ...]
    layers: list[LayerSpec]
    groups: list[ChannelGroup]
    total_params: int
    total_macs: int
    model: str | None = None
    unused: list[str] = field(default_factory=list)  # conv/linear never run in forward
    #: residual blocks (optional in the JSON: a format-1 spec written before them has none)
    blocks: list[ResidualBlock] = field(default_factory=list)

    def layer(self, name: str) -> LayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in the network spec")

    def group(self, gid: int) -> ChannelGroup:
        return self.groups[gid]

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def partial_layers(self, gid: int) -> list[str]:
        """Layers holding only part of group ``gid``'s channels (a concatenation or split).

        ``LayerSpec.dims`` gives such layers the group's whole count, so the latency model
        cannot price pruning that group: HALP leaves it dense.
        """
        channels = self.group(gid).channels
        return [la.name for la in self.layers
                if (la.out_group == gid and la.cout != channels)
                or any(s == gid and n != channels for s, n in la.in_sources)]

    def sizable_groups(self) -> list[int]:
        """Prunable groups every member layer holds whole: those the latency model can price."""
        return [g.id for g in self.prunable_groups if not self.partial_layers(g.id)]

    @property
    def removable_blocks(self) -> list[ResidualBlock]:
        return [b for b in self.blocks if b.removable]

    def removed_blocks(self, counts: Mapping[int, int]) -> list[ResidualBlock]:
        """The removable blocks whose groups all keep zero channels in ``counts``; a block with
        only some of its groups at zero is an error (it would compute neither function)."""
        removed = []
        for block in self.removable_blocks:
            zero = [counts.get(g, 1) == 0 for g in block.groups]
            if all(zero):
                removed.append(block)
            elif any(zero):
                raise StructureError(
                    f"block {block.name}: groups {block.groups} must keep zero channels "
                    "together (the block removed) or all keep some")
        return removed

    def without(self, blocks: list[ResidualBlock]) -> NetworkSpec:
        """This network with ``blocks`` replaced by the identity (their layers gone)."""
        gone = {name for b in blocks for name in b.layers}
        return replace(self, layers=[la for la in self.layers if la.name not in gone],
                       blocks=[b for b in self.blocks if b not in blocks])

    def dense_counts(self) -> dict[int, int]:
        return {g.id: g.channels for g in self.groups}

    def macs(self, counts: Mapping[int, int] | None = None) -> int:
        """Conv/linear MACs per sample when each group keeps ``counts[group]`` channels."""
        return sum(layer.macs_at(*layer.dims(counts)) for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkSpec:
        if data.get("format") != SPEC_FORMAT:
            raise StructureError(
                f"network spec format {data.get('format')!r} is not {SPEC_FORMAT}; "
                "re-run `halp analyze` with this version"
            )
        layers = []
        for d in data["layers"]:
            d = dict(d, op=_op(d))
            for key in ("kernel", "stride", "padding", "dilation", "in_hw", "out_hw",
                        "output_padding"):
                d[key] = tuple(d[key])
            d["in_sources"] = [tuple(s) for s in d["in_sources"]]
            layers.append(LayerSpec(**d))
        return cls(
            input_shape=tuple(data["input_shape"]),
            layers=layers,
            groups=[ChannelGroup(**g) for g in data["groups"]],
            total_params=data["total_params"],
            total_macs=data["total_macs"],
            model=data.get("model"),
            unused=list(data.get("unused", [])),
            blocks=[ResidualBlock(**b) for b in data.get("blocks", [])],
        )

    @classmethod
    def from_json(cls, text: str) -> NetworkSpec:
        return cls.from_dict(json.loads(text))


def _op(layer: Mapping[str, Any]) -> OpKind:
    """A stored layer's op, refused with the layer's name when the latency model has no such
    kind (a spec or table from another tool or a newer version)."""
    try:
        return OpKind(layer.get("op"))
    except ValueError:
        raise StructureError(
            f"layer {layer.get('name')!r} has op {layer.get('op')!r}, not one of "
            f"{', '.join(OpKind)}; re-run `halp analyze` with this version"
        ) from None
