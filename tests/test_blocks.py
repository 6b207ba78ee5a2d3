"""Residual blocks found in real torchvision graphs, and depth pruning: removed blocks are the
identity in the masked model, nn.Identity in the slim one, and the slim network exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from pipeline.commands.analyze import render
from pipeline.errors import StructureError
from pipeline.export import to_onnx
from pipeline.slim import dependency_graph, mask_entries, mask_plan, slim, zero_entries
from pipeline.spec import NetworkSpec
from pipeline.structure import analyze

X = torch.randn(1, 3, 64, 64)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=10)


def _downsampling(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if hasattr(m, "downsample")
            and m.downsample is not None}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_removable_blocks_are_the_non_downsampling_ones(name: str) -> None:
    model = _model(name)
    spec = analyze(model, X)
    blocks = {n for n, m in model.named_modules() if n.startswith("layer") and n.count(".") == 1}
    assert {b.name for b in spec.blocks} == blocks
    assert {b.name for b in spec.removable_blocks} == blocks - _downsampling(model)
    for block in spec.removable_blocks:
        assert block.act == "relu" and len(block.groups) == (2 if name == "resnet50" else 1)
        assert all(spec.group(g).layers and all(n.startswith(block.name + ".")
                                                for n in spec.group(g).layers)
                   for g in block.groups)
    assert {b.reason for b in spec.blocks if not b.removable} == \
        {"the skip path has layers of its own (e.g. a downsampling convolution)"}
    assert NetworkSpec.from_json(spec.to_json()).blocks == spec.blocks
    removable = len(spec.removable_blocks)
    assert f"Residual blocks ({removable} of {len(blocks)} removable" in render(spec)


def test_mobilenet_v2_removable_blocks_are_its_residual_inverted_residuals() -> None:
    model = _model("mobilenet_v2")
    spec = analyze(model, X)
    residual = {n for n, m in model.named_modules() if getattr(m, "use_res_connect", False)}
    assert residual and {b.name for b in spec.removable_blocks} == residual
    assert all(b.act is None and len(b.groups) == 1 for b in spec.blocks)


def test_a_spec_without_blocks_still_loads() -> None:
    data = analyze(_model("resnet18"), X).to_dict()
    del data["blocks"]
    assert NetworkSpec.from_dict(data).blocks == []


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_a_removed_block_slims_to_identity_and_exports(name: str, tmp_path) -> None:
    model = _model(name).eval()
    spec = analyze(model, X)
    gone = spec.removable_blocks[1]
    rng = np.random.default_rng(0)
    keep = {g.id: [] if g.id in gone.groups else
            sorted(rng.choice(g.channels, max(1, g.channels // 2), replace=False).tolist())
            for g in spec.prunable_groups}
    slimmed = slim(model, X, keep, spec=spec)  # checked equal to the masked model inside
    assert isinstance(slimmed.get_submodule(gone.name), nn.Identity)
    assert sum(isinstance(m, nn.Identity) for m in slimmed.modules()) == \
        sum(isinstance(m, nn.Identity) for m in model.modules()) + 1
    after = analyze(slimmed, X)
    assert len(after.blocks) == len(spec.blocks) - 1
    assert len(after.layers) == len(spec.layers) - len(gone.layers)
    # the pruner's masks: the whole block zeroed, so its branch adds exactly nothing
    masked = _model(name).eval()
    drop = {g: sorted(set(range(spec.group(g).channels)) - set(k)) for g, k in keep.items()}
    zero_entries(mask_entries(masked, mask_plan(dependency_graph(masked, X), spec, drop)))
    assert all(not p.any() for p in masked.get_submodule(gone.name).parameters())
    with torch.no_grad():
        torch.testing.assert_close(masked(X), slimmed(X), rtol=1e-4, atol=1e-5)
    protos = [to_onnx(m, X, tmp_path / f"{i}.onnx")  # ONNX Runtime checked against torch
              for i, m in enumerate((model, slimmed))]
    convs = [sum(n.op_type == "Conv" for n in p.graph.node) for p in protos]
    assert convs[1] == convs[0] - len(gone.layers)


def test_emptying_part_of_a_block_is_refused() -> None:
    model = _model("resnet50")
    spec = analyze(model, X)
    block = spec.removable_blocks[0]
    with pytest.raises(StructureError, match="must keep zero channels together"):
        slim(model, X, {block.groups[0]: []}, spec=spec)
    downsampling = next(b for b in spec.blocks if not b.removable)
    with pytest.raises(StructureError, match="keep at least one index"):
        slim(model, X, {g: [] for g in downsampling.groups}, spec=spec)
