"""Model → :class:`NetworkSpec`: the layers HALP times and the coupled channel groups it prunes.

The structure is derived from the model itself with Torch-Pruning's ``DependencyGraph``, so no
per-model configuration is needed: residual adds, concatenations, depthwise ties and channel
splits come out of the traced graph as coupled groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from . import layer_context
from .errors import StructureError, UnsupportedLayer
from .spec import ChannelGroup, LayerSpec, NetworkSpec

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
