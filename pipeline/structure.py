"""Model → :class:`NetworkSpec`: the layers HALP times and the coupled channel groups it prunes.

The structure is derived from the model itself with Torch-Pruning's ``DependencyGraph``, so no
per-model configuration is needed: residual adds, concatenations, depthwise ties and channel
splits come out of the traced graph as coupled groups (read off it by
:mod:`pipeline.dependency`). :func:`trace` keeps that graph for the pruner's masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from . import layer_context
from .blocks import residual_blocks
from .dependency import channel_groups, is_layer, layer_spec
from .errors import StructureError, UnsupportedLayer
from .spec import LayerSpec, NetworkSpec, call_name


class _ForwardRecorder:
    """Forward hooks that record each layer's input/output shapes, once per call, and the
    innermost running module.

    The running-module stack lets a tracing failure name the layer it happened in.
    """

    def __init__(self, model: nn.Module):
        self.names = {m: n for n, m in model.named_modules()}
        self.shapes: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
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
        if self.recording and is_layer(m) and isinstance(out, torch.Tensor) and args:
            self.shapes.setdefault(name, []).append((tuple(args[0].shape), tuple(out.shape)))

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


@dataclass(frozen=True)
class Analysis:
    """One trace of a model: its spec, the Torch-Pruning graph the spec was read from (masks
    and slimming use it, so the pruner traces once) and the stem, the first conv/linear layer
    run on the input."""

    spec: NetworkSpec
    graph: tp.DependencyGraph
    stem: str | None


#: what torchvision's FrozenBatchNorm2d keeps per channel, all in buffers
FROZEN_NORM_BUFFERS = ("weight", "bias", "running_mean", "running_var")


class FrozenNormPruner(tp.pruner.function.BasePruningFunc):
    """Channel pruning of torchvision's ``FrozenBatchNorm2d`` (its four statistics are buffers,
    so Torch-Pruning does not know it): detectors built on pretrained backbones use it, and a
    norm left at full width would break every group it sits in."""

    TARGET_MODULES = (FrozenBatchNorm2d,)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        drop = set(idxs)
        keep = torch.tensor([i for i in range(layer.weight.numel()) if i not in drop])
        for name in FROZEN_NORM_BUFFERS:
            setattr(layer, name, getattr(layer, name)[keep.to(layer.weight.device)])
        return layer

    prune_in_channels = prune_out_channels  # one channel axis: in and out are tied

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.weight.numel())

    get_in_channels = get_out_channels


#: Torch-Pruning pruners for modules it does not know, passed to every graph built here
CUSTOM_PRUNERS = {FrozenBatchNorm2d: FrozenNormPruner()}


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning graph of ``model``, traced in eval mode so BN running stats stay put."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, customized_pruners=CUSTOM_PRUNERS,
                verbose=False)
    finally:
        model.train(was_training)


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
    return trace(model, example_input, ignore=ignore, name=name).spec


def trace(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ignore: Iterable[str | nn.Module] | None = None,
    ignore_stem: bool = False,
    name: str | None = None,
) -> Analysis:
    """:func:`analyze`, keeping the dependency graph and the stem; ``ignore_stem`` also leaves
    the stem's output channels dense (HALP never prunes the layer that reads the image)."""
    modules = dict(model.named_modules())
    ignored = _ignored(ignore, modules)
    recorder, dg, tp_groups = _record(model, example_input, name or type(model).__name__)
    stem = next(iter(recorder.shapes), None)  # conv/linear layers finish in the order they start
    if ignore_stem and stem is not None:
        ignored.add(stem)
    groups, out_group, in_parts = channel_groups(tp_groups, dg, modules, ignored)
    batch = int(example_input.shape[0])
    layers = [layer_spec(call_name(lname, k), mod, shapes, dg, batch, out_group.get(lname),
                         in_parts.get(lname, []), groups)
              for lname, mod in modules.items() if lname in recorder.shapes
              for k, shapes in enumerate(recorder.shapes[lname])]
    _attach_context(model, example_input, layers)
    spec = NetworkSpec(
        input_shape=tuple(example_input.shape),
        layers=layers,
        groups=groups,
        total_params=sum(p.numel() for p in model.parameters()),
        total_macs=sum(layer.macs for layer in layers),
        model=name,
        unused=[n for n, m in modules.items() if is_layer(m) and n not in recorder.shapes],
    )
    spec.blocks = residual_blocks(model, example_input, spec)
    return Analysis(spec, dg, stem)


def _ignored(ignore: Iterable[str | nn.Module] | None, modules: Mapping[str, nn.Module]
             ) -> set[str]:
    """Names of the ignored modules, checked against the model."""
    names = {m: n for n, m in modules.items()}
    ignored = set()
    for item in ignore or ():
        if isinstance(item, nn.Module):
            if item not in names:
                raise StructureError("an ignored module is not part of the model")
            ignored.add(names[item])
        else:
            ignored.add(str(item))
    unknown = [n for n in ignored if n not in modules]
    if unknown:
        raise StructureError(
            f"ignore names {unknown} are not modules of the model; use names from "
            "model.named_modules() (see `halp analyze`)"
        )
    return ignored


def _record(model: nn.Module, example_input: torch.Tensor, what: str
            ) -> tuple[_ForwardRecorder, tp.DependencyGraph, list[Any]]:
    """One forward pass recording each layer's shapes, then the dependency graph and its
    groups; a failure names the layer or graph op it happened in."""
    was_training = model.training
    recorder = _ForwardRecorder(model)
    try:
        model.eval()
        try:
            with torch.no_grad():
                model(example_input)
        except Exception as exc:
            raise StructureError(
                f"{what} does not run on an input of shape "
                f"{'x'.join(map(str, example_input.shape))}{recorder.where(exc)}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}. Check --input (batch first, "
                "e.g. 1x3x224x224)"
            ) from exc
        recorder.stack.clear()
        recorder.recording = False
        dg = dependency_graph(model, example_input)
        tp_groups = list(dg.get_all_groups(root_module_types=(nn.modules.conv._ConvNd,
                                                              nn.Linear)))
    except (UnsupportedLayer, StructureError):
        raise
    except Exception as exc:  # Torch-Pruning/autograd raise many types while tracing
        raise StructureError(
            f"Torch-Pruning could not trace {what}{recorder.where(exc)}: {type(exc).__name__}: "
            f"{exc}. Make the forward pass traceable by autograd (no in-place ops on leaf "
            "tensors, tensors not Python numbers), or exclude the layer with ignore="
        ) from exc
    finally:
        recorder.close()
        model.train(was_training)
    return recorder, dg, tp_groups

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
