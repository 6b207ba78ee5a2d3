"""Masks and physical slimming, both derived from the same Torch-Pruning groups.

Dropping channel ``i`` of a coupled group touches every layer of the group: the filters that
produce it, the batch norms over it and the input weights of the layers that read it (with
concat offsets and flatten expansion already mapped by Torch-Pruning). A *mask plan* lists those
entries; zeroing them gives the masked model the pruner trains, removing them gives the slim
model. Because both come from one plan, ``slim`` can check that the two compute the same
function and refuse to return a model that does not.

A removable residual block whose inner groups all keep zero channels is removed
(:mod:`pipeline.blocks`): masked, every parameter of the block is zeroed, so its branch outputs
exactly zero (its last BatchNorm's shift included) and the block passes its input on; slimmed,
the block is replaced with ``nn.Identity``, which computes the same.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from .dependency import NORMS
from .errors import StructureError, UnsupportedLayer
from .export import output_tensors
from .spec import NetworkSpec, ResidualBlock
from .structure import analyze, dependency_graph

#: {parameter name: [(dim, sorted indices to zero)]}
MaskPlan = dict[str, list[tuple[int, list[int]]]]
#: resolved plan: (parameter or buffer, dim, index tensor)
MaskEntries = list[tuple[torch.Tensor, int, torch.Tensor]]
Keep = Mapping[int, Sequence[int] | int]


def pruning_group(dg: tp.DependencyGraph, spec: NetworkSpec, gid: int, idxs: Sequence[int]):
    """Torch-Pruning group removing output channels ``idxs`` of spec group ``gid``."""
    names = {n: m for m, n in _module_names(dg).items()}
    root = next(names[p] for p in spec.group(gid).producers if p in names)  # not in a removed
    # block
    return dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels,
                                list(idxs))


def _module_names(dg: tp.DependencyGraph) -> dict[nn.Module, str]:
    return {m: n for n, m in dg.model.named_modules()}


def mask_plan(dg: tp.DependencyGraph, spec: NetworkSpec, drop: Mapping[int, Sequence[int]]
              ) -> MaskPlan:
    """Parameter entries to zero so that the channels in ``drop`` (per group) are gone, and
    every parameter of the blocks they remove (those still in ``dg``'s model)."""
    names = _module_names(dg)
    removed = removed_blocks(spec, drop)
    gone = {g for b in removed for g in b.groups}
    merged: dict[tuple[str, int], set[int]] = {}
    for name, dim, idxs in _block_entries(dg.model, removed):
        merged[(name, dim)] = set(idxs)
    for gid, idxs in drop.items():
        if not idxs or gid in gone:
            continue
        for dep, dep_idxs in pruning_group(dg, spec, gid, idxs):
            module = dep.target.module
            if module not in names:  # a bare nn.Parameter: no layer weights to mask
                continue
            out = dg.is_out_channel_pruning_fn(dep.handler)
            for pname, dim in _param_dims(module, names[module], out):
                merged.setdefault((f"{names[module]}.{pname}", dim), set()).update(dep_idxs)
    plan: MaskPlan = {}
    for (pname, dim), idxs in sorted(merged.items()):
        plan.setdefault(pname, []).append((dim, sorted(idxs)))
    return plan


def removed_blocks(spec: NetworkSpec, drop: Mapping[int, Sequence[int]]) -> list[ResidualBlock]:
    """The blocks ``drop`` removes: every channel of each of their inner groups dropped."""
    return spec.removed_blocks({g: spec.group(g).channels - len(idxs) for g, idxs in drop.items()})


def _block_entries(model: nn.Module, blocks: Sequence[ResidualBlock]
                   ) -> list[tuple[str, int, list[int]]]:
    """(parameter, dim 0, every index) for each parameter of ``blocks`` in ``model``."""
    found = []
    for block in blocks:
        for pname, param in model.get_submodule(block.name).named_parameters():
            if param.dim():
                found.append((f"{block.name}.{pname}", 0, list(range(param.shape[0]))))
    return found


def _param_dims(module: nn.Module, name: str, out: bool) -> list[tuple[str, int]]:
    """(parameter, dim) holding the pruned channels of ``module`` (out- or input side)."""
    if isinstance(module, NORMS):  # scale and shift zero: the channel outputs 0 (a frozen
        # norm keeps them in buffers, always present)
        return [("weight", 0), ("bias", 0)] if getattr(module, "affine", True) else []
    if isinstance(module, nn.Linear):
        if not out:
            return [("weight", 1)]
        return [("weight", 0)] + ([("bias", 0)] if module.bias is not None else [])
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            raise UnsupportedLayer(
                f"{name} is a grouped convolution (groups={module.groups}); its channels "
                "cannot be masked: exclude it with ignore="
            )
        if out or depthwise:
            dim = 1 if module.transposed else 0
            return [("weight", dim)] + ([("bias", 0)] if module.bias is not None else [])
        return [("weight", 0 if module.transposed else 1)]
    return []  # parameter-free ops (pooling, activations) carry channels without weights


def mask_entries(model: nn.Module, plan: MaskPlan) -> MaskEntries:
    """Resolve a plan against ``model``'s parameters (on their devices), and buffers where a
    frozen norm keeps its scale and shift in them."""
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    return [(params[name], dim, torch.tensor(idxs, dtype=torch.long, device=params[name].device))
            for name, ops in plan.items() for dim, idxs in ops]


def zero_entries(entries: MaskEntries) -> None:
    """Zero the masked parameter entries and their gradients, in place."""
    with torch.no_grad():
        for param, dim, idx in entries:
            idx = idx.to(param.device)
            param.index_fill_(dim, idx, 0)
            if param.grad is not None:
                param.grad.index_fill_(dim, idx, 0)


def dropped_channels(spec: NetworkSpec, keep: Keep) -> dict[int, list[int]]:
    """Validate ``keep`` ({group: kept indices, or a count = the first n}) → dropped indices.
    Only the inner groups of a removable block may keep nothing, all at once (the block
    removed)."""
    drop: dict[int, list[int]] = {}
    empty = {g for g, kept in keep.items() if not (kept if isinstance(kept, (int, np.integer))
                                                    else len(kept))}
    removed = spec.removed_blocks({g: 0 for g in empty})
    for gid, kept in keep.items():
        if not 0 <= gid < len(spec.groups):
            raise StructureError(f"keep names group {gid}, but the network has groups "
                                 f"0..{len(spec.groups) - 1}")
        group = spec.group(gid)
        idxs = sorted(set(range(int(kept)) if isinstance(kept, (int, np.integer))
                          else (int(i) for i in kept)))
        if not idxs and any(gid in b.groups for b in removed):
            drop[gid] = list(range(group.channels))
            continue
        if not idxs or idxs[0] < 0 or idxs[-1] >= group.channels:
            raise StructureError(
                f"group {gid} keeps {len(idxs)} channel(s) {idxs[:3]}..., but it has channels "
                f"0..{group.channels - 1}: keep at least one index in that range"
            )
        if len(idxs) == group.channels:
            continue
        if not group.prunable:
            raise StructureError(f"group {gid} is not prunable ({group.reason}); keep all "
                                 f"{group.channels} of its channels")
        drop[gid] = sorted(set(range(group.channels)) - set(idxs))
    return drop


def slim(model: nn.Module, example_input: torch.Tensor, keep: Keep,
         spec: NetworkSpec | None = None, *, rtol: float = 1e-4) -> nn.Module:
    """A physically slimmed copy of ``model`` keeping ``keep[g]`` channels of each group g.

    ``keep`` maps group ids of ``spec`` (default: ``analyze(model, example_input)``) to the kept
    channel indices, or to a count (keep the first n). Groups not named keep every channel.
    A removable block whose inner groups all keep nothing is replaced with ``nn.Identity``.
    The copy is checked against ``model`` with the dropped channels zeroed (and the removed
    blocks' parameters); a mismatch raises StructureError. ``model`` itself is not modified.
    """
    spec = spec or analyze(model, example_input)
    drop = dropped_channels(spec, keep)
    removed = removed_blocks(spec, drop)
    pruned = copy.deepcopy(model)
    for block in removed:
        parent, _, child = block.name.rpartition(".")
        setattr(pruned.get_submodule(parent), child, nn.Identity())
    dg = dependency_graph(pruned, example_input)
    gone = {g for b in removed for g in b.groups}
    drop = {g: idxs for g, idxs in drop.items() if g not in gone}
    reference = copy.deepcopy(model)
    zero_entries(mask_entries(reference, mask_plan(dg, spec, drop)))
    zero_entries(mask_entries(reference, {name: [(dim, idxs)] for name, dim, idxs
                                          in _block_entries(reference, removed)}))
    for gid, idxs in drop.items():
        group = pruning_group(dg, spec, gid, idxs)
        if not dg.check_pruning_group(group):
            raise StructureError(
                f"dropping channels {idxs[:4]}... of group {gid} would remove every channel of "
                "one of its layers (e.g. one branch of a concatenation): keep at least one "
                "channel of each producer " + ", ".join(spec.group(gid).producers)
            )
        group.prune()
    check_equivalent(reference, pruned, example_input, rtol=rtol)
    return pruned


def _probe(example_input: torch.Tensor) -> torch.Tensor:
    """A seeded random input like ``example_input`` (integer inputs, e.g. token ids, as given)."""
    if not example_input.is_floating_point():
        return example_input
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(example_input.shape, generator=gen, dtype=example_input.dtype)
    return x.to(example_input.device)


def check_equivalent(reference: nn.Module, candidate: nn.Module, example_input: torch.Tensor,
                     *, rtol: float = 1e-4) -> float:
    """Largest output difference relative to the output scale (eval mode, random input).

    Raises StructureError when above ``rtol`` or when the outputs differ in structure.
    """
    x = _probe(example_input)
    outs = []
    for m in (reference, candidate):
        was_training = m.training
        m.eval()
        try:
            with torch.no_grad():
                outs.append(output_tensors(m(x)))
        finally:
            m.train(was_training)
    ref, got = outs
    shapes = [tuple(t.shape) for t in ref], [tuple(t.shape) for t in got]
    if shapes[0] != shapes[1]:
        raise StructureError(f"slimmed model outputs have shapes {shapes[1]}, the masked model "
                             f"{shapes[0]}: Torch-Pruning changed an output; report this model")
    worst = 0.0
    for r, c in zip(ref, got, strict=True):
        scale = float(r.abs().max()) if r.numel() else 0.0
        err = float((r - c).abs().max()) if r.numel() else 0.0
        worst = max(worst, err / max(scale, 1e-12))
    if not worst <= rtol:
        raise StructureError(
            f"slimmed model differs from the masked model by {worst:.3g} (relative, limit "
            f"{rtol:g}): removing the channels changed the function, e.g. a normalisation over "
            "channels or an op Torch-Pruning maps wrongly; exclude those layers with ignore="
        )
    return worst
