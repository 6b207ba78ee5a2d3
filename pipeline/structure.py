"""Model → :class:`NetworkSpec`: the layers HALP times and the coupled channel groups it prunes.

The structure is derived from the model itself with Torch-Pruning's ``DependencyGraph``, so no
per-model configuration is needed: residual adds, concatenations, depthwise ties and channel
splits come out of the traced graph as coupled groups.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from . import layer_context
from .errors import StructureError, UnsupportedLayer

SPEC_FORMAT = 1

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
    op: str  # "conv" | "dwconv" | "linear" | "deconv"
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
        if self.op == "conv" and self.groups > 1:
            parts.append(f"g{self.groups}")
        if self.output_padding and any(self.output_padding):
            parts.append("op" + "x".join(map(str, self.output_padding)))
        if self.pre or self.post:
            parts.append(layer_context.describe(self.pre, self.post))
        return "|".join(parts)

    def dims(self, counts: Mapping[int, int] | None = None) -> tuple[int, int]:
        """(cin, cout) of this layer when each group keeps ``counts[group]`` channels."""
        counts = counts or {}
        cin = self.in_expand * sum(
            counts.get(g, c) if g is not None else c for g, c in self.in_sources
        ) if self.in_sources else self.cin
        cout = counts.get(self.out_group, self.cout) if self.out_group is not None else self.cout
        if self.op == "dwconv":
            cin = cout
        return cin, cout

    def macs_at(self, cin: int, cout: int) -> int:
        """Multiply-accumulates per sample at the given channel counts."""
        k = math.prod(self.kernel) if self.kernel else 1
        if self.op == "dwconv":
            return cout * k * math.prod(self.out_hw)
        if self.op == "linear":
            return cin * cout * math.prod(self.in_hw)
        if self.op == "deconv":
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
class NetworkSpec:
    input_shape: tuple[int, ...]
    layers: list[LayerSpec]
    groups: list[ChannelGroup]
    total_params: int
    total_macs: int
    model: str | None = None
    unused: list[str] = field(default_factory=list)  # conv/linear never run in forward

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
            d = dict(d)
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
        )

    @classmethod
    def from_json(cls, text: str) -> NetworkSpec:
        return cls.from_dict(json.loads(text))


def _op_kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return "deconv"
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            return "dwconv"
        return "conv"
    raise UnsupportedLayer(f"{type(m).__name__} is not a conv or linear layer")


def _out_channels(m: nn.Module) -> int:
    return int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))


class _ForwardRecorder:
    """Forward hooks that record each layer's input/output shape and the innermost running module.

    The running-module stack lets a tracing failure name the layer it happened in.
    """

    def __init__(self, model: nn.Module):
        self.names = {m: n for n, m in model.named_modules()}
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.calls: dict[str, int] = {}
        self.stack: list[str] = []
        self.recording = True  # shapes are taken from our own forward pass only
        self._handles = []
        for m in model.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, m: nn.Module, args: Any) -> None:
        self.stack.append(self.names.get(m, type(m).__name__))

    def _post(self, m: nn.Module, args: Any, out: Any) -> None:
        name = self.stack.pop() if self.stack else self.names.get(m, "")
        if self.recording and _is_layer(m) and isinstance(out, torch.Tensor) and args:
            x = args[0]
            self.calls[name] = self.calls.get(name, 0) + 1
            self.shapes.setdefault(name, (tuple(x.shape), tuple(out.shape)))

    def where(self, exc: BaseException) -> str:
        """Name the layer (during forward) or graph op (during dependency analysis) that failed."""
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        if any(f.f_code.co_name == "_call_impl" for f in frames) and self.stack:
            return f" (while running layer {self.stack[-1] or '<model>'!r})"
        for frame in reversed(frames):
            node = frame.f_locals.get("node")
            if isinstance(node, tp.dependency.Node):
                after = [n.name for n in node.inputs if self.names.get(n.module)]
                return f" at op {node.name}" + (f" after {after[0]}" if after else "")
        return ""

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _spatial(shape: tuple[int, ...], op: str) -> tuple[int, ...]:
    # linear: the dims between batch and features (tokens); conv: everything after channels
    return tuple(shape[1:-1]) if op == "linear" else tuple(shape[2:])


def _activation_after(node: Any) -> tuple[bool, str | None]:
    """(followed by BatchNorm, fused activation name) for a layer's DependencyGraph node."""
    has_bn, act = False, None
    cur = node
    if len(cur.outputs) == 1 and cur.outputs[0].type == tp.ops.OPTYPE.BN:
        has_bn = True
        cur = cur.outputs[0]
    if len(cur.outputs) == 1:
        nxt = cur.outputs[0]
        # the activation is an OUTPUT node when it is the network's last op
        if nxt.type in (tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.OUTPUT) and nxt.grad_fn:
            act = _ACTIVATIONS.get(nxt.grad_fn.name())
    return has_bn, act


def _layer_names(
    ignore: Iterable[str | nn.Module] | None, names: Mapping[nn.Module, str]
) -> set[str]:
    out = set()
    for item in ignore or ():
        if isinstance(item, nn.Module):
            if item not in names:
                raise StructureError("an ignored module is not part of the model")
            out.add(names[item])
        else:
            out.add(str(item))
    return out


def analyze(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ignore: Iterable[str | nn.Module] | None = None,
    name: str | None = None,
) -> NetworkSpec:
    """Trace ``model`` on ``example_input`` and describe its layers and coupled channel groups.

    Groups whose channels reach the network output (the classifier), groups containing a grouped
    (non-depthwise) convolution, and groups with a layer named in ``ignore`` (names as in
    ``model.named_modules()``, or modules; a name also matches its sub-modules) are marked not
    prunable, with the reason.
    """
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    ignored = _layer_names(ignore, names)
    unknown = [n for n in ignored if n not in modules]
    if unknown:
        raise StructureError(
            f"ignore names {unknown} are not modules of the model; use names from "
            "model.named_modules() (see `halp analyze`)"
        )
    was_training = model.training
    recorder = _ForwardRecorder(model)
    try:
        model.eval()
        try:
            with torch.no_grad():
                model(example_input)
        except Exception as exc:
            raise StructureError(
                f"{name or type(model).__name__} does not run on an input of shape "
                f"{'x'.join(map(str, example_input.shape))}{recorder.where(exc)}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}. Check --input (batch first, "
                "e.g. 1x3x224x224)"
            ) from exc
        recorder.stack.clear()
        recorder.recording = False
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                   verbose=False)
        tp_groups = list(dg.get_all_groups(root_module_types=(nn.modules.conv._ConvNd,
                                                              nn.Linear)))
    except (UnsupportedLayer, StructureError):
        raise
    except Exception as exc:  # Torch-Pruning/autograd raise many types while tracing
        raise StructureError(
            f"Torch-Pruning could not trace {name or type(model).__name__}"
            f"{recorder.where(exc)}: {type(exc).__name__}: {exc}. Make the forward pass traceable "
            "by autograd (no in-place ops on leaf tensors, tensors not Python numbers), or "
            "exclude the layer with ignore="
        ) from exc
    finally:
        recorder.close()
        model.train(was_training)

    shared = {n: c for n, c in recorder.calls.items() if c > 1}
    if shared:
        raise UnsupportedLayer(
            f"layers {sorted(shared)} run more than once per forward pass (shared weights); "
            "HALP's per-layer latency model needs one call per layer: give each call its own "
            "module"
        )

    groups: list[ChannelGroup] = []
    out_group: dict[str, int] = {}
    in_parts: dict[str, list[tuple[int, int, int]]] = {}  # name -> (first idx, gid, n idxs)
    for gid, group in enumerate(tp_groups):
        producers, consumers, norms = [], [], []
        reaches_output = False
        reasons = []
        for dep, idxs in group:
            node, mod = dep.target, dep.target.module
            consumed = _is_layer(mod) and not dg.is_out_channel_pruning_fn(dep.handler)
            if node.type == tp.ops.OPTYPE.OUTPUT or (not node.outputs and not consumed):
                reaches_output = True  # a node without successors produces the model output
            lname = names.get(mod)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                norms.append(lname)
            if not _is_layer(mod) or lname is None:
                continue
            kind = _op_kind(mod)
            if dg.is_out_channel_pruning_fn(dep.handler):
                producers.append(lname)
                out_group[lname] = gid
                if kind == "dwconv":
                    consumers.append(lname)
                    in_parts.setdefault(lname, []).append((0, gid, mod.out_channels))
            elif dg.is_in_channel_pruning_fn(dep.handler):
                consumers.append(lname)
                in_parts.setdefault(lname, []).append((min(idxs), gid, len(idxs)))
            if kind == "conv" and mod.groups > 1:
                reasons.append(f"grouped convolution {lname} (groups={mod.groups})")
        if reaches_output:
            reasons.insert(0, "channels reach the network output")
        hit = sorted(n for n in producers + consumers + norms
                     if any(n == i or n.startswith(i + ".") for i in ignored))
        if hit:
            reasons.append(f"ignored layer {hit[0]}")
        root = group[0].dep.target.module
        channels = _out_channels(root)
        # producers holding part of the group must partition it (a concatenation); anything
        # else is a mapping Torch-Pruning got wrong, e.g. the raw input inside a concatenation
        partial = [p for p in producers if _out_channels(modules[p]) != channels]
        if partial and sum(_out_channels(modules[p]) for p in partial) != channels:
            reasons.append(f"Torch-Pruning maps {partial[0]} "
                           f"({_out_channels(modules[partial[0]])} channels) into a "
                           f"{channels}-channel group")
        groups.append(ChannelGroup(
            id=gid,
            channels=channels,
            producers=producers,
            consumers=list(dict.fromkeys(consumers)),
            norms=list(dict.fromkeys(norms)),
            prunable=not reasons,
            reason="; ".join(dict.fromkeys(reasons)) or None,
        ))

    batch = int(example_input.shape[0])
    layers: list[LayerSpec] = []
    unused = []
    for lname, mod in modules.items():
        if not _is_layer(mod):
            continue
        if lname not in recorder.shapes:
            unused.append(lname)
            continue
        layers.append(_layer_spec(lname, mod, recorder.shapes[lname], dg, batch,
                                  out_group.get(lname), in_parts.get(lname, []), groups))
    _attach_context(model, example_input, layers)
    return NetworkSpec(
        input_shape=tuple(example_input.shape),
        layers=layers,
        groups=groups,
        total_params=sum(p.numel() for p in model.parameters()),
        total_macs=sum(layer.macs for layer in layers),
        model=name,
        unused=unused,
    )


def _attach_context(model: nn.Module, example_input: torch.Tensor,
                    layers: list[LayerSpec]) -> None:
    """Each layer's ``pre``/``post`` ops (:mod:`pipeline.layer_context`), traced in eval mode
    like the rest of the analysis; the activation already fused into a layer is not repeated."""
    was_training = model.training
    try:
        with torch.no_grad():
            context = layer_context.find(model.eval(), example_input,
                                         {layer.name: layer.act for layer in layers})
    finally:
        model.train(was_training)
    for layer in layers:
        layer.pre, layer.post = context[layer.name]


def _layer_spec(
    lname: str,
    mod: nn.Module,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    dg: tp.DependencyGraph,
    batch: int,
    out_gid: int | None,
    parts: list[tuple[int, int, int]],
    groups: list[ChannelGroup],
) -> LayerSpec:
    kind = _op_kind(mod)
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
