"""Physical slimming through Torch-Pruning groups, checked against the masked model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import StructureError
from pipeline.slim import (
    check_equivalent,
    dependency_graph,
    mask_entries,
    mask_plan,
    slim,
    zero_entries,
)
from pipeline.structure import analyze


class ConcatNet(nn.Module):
    """Concatenation (input offsets), a depthwise conv and flatten → linear (input expansion)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 10, 1), nn.BatchNorm2d(10), nn.Sigmoid())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.dw(torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1))


def _random_keep(spec, seed: int = 0) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    return {g.id: sorted(rng.choice(g.channels, max(1, g.channels // 3), replace=False).tolist())
            for g in spec.prunable_groups}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "concat"])
def test_slim_matches_masked_model_and_spec(name: str) -> None:
    torch.manual_seed(0)
    model = ConcatNet() if name == "concat" else \
        torchvision.models.get_model(name, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    spec = analyze(model, x)
    keep = _random_keep(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slimmed = slim(model, x, keep, spec=spec)
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k
    # an independent masked reference: zero the dropped channels of a fresh plan
    drop = {g: sorted(set(range(spec.group(g).channels)) - set(k)) for g, k in keep.items()}
    zero_entries(mask_entries(model, mask_plan(dependency_graph(model, x), spec, drop)))
    assert check_equivalent(model, slimmed, x) <= 1e-4
    after = analyze(slimmed, x)
    assert [g.channels for g in after.groups] == \
        [len(keep.get(g.id, range(g.channels))) for g in spec.groups]


def test_counts_keep_the_first_channels() -> None:
    torch.manual_seed(0)
    model = ConcatNet()
    x = torch.randn(1, 3, 16, 16)
    spec = analyze(model, x)
    (stem,) = [g for g in spec.prunable_groups if g.producers == ["stem"]]
    slimmed = slim(model, x, {stem.id: 5}, spec=spec)
    assert slimmed.stem.out_channels == 5 and slimmed.a[0].in_channels == 5
    torch.testing.assert_close(slimmed.stem.weight, model.stem.weight[:5])


def test_emptying_a_concatenated_branch_is_refused() -> None:
    model = ConcatNet()
    x = torch.randn(1, 3, 16, 16)
    spec = analyze(model, x)
    (cat,) = [g for g in spec.prunable_groups if g.channels == 16]
    with pytest.raises(StructureError, match="every channel of one of its layers"):
        slim(model, x, {cat.id: 5}, spec=spec)  # channels 0..5 are branch a's: b keeps none


def test_masks_cover_producers_norms_and_consumers() -> None:
    model = ConcatNet()
    x = torch.randn(1, 3, 16, 16)
    spec = analyze(model, x)
    (cat,) = [g for g in spec.prunable_groups if g.channels == 16]
    plan = mask_plan(dependency_graph(model, x), spec, {cat.id: [2, 9]})
    # channel 2 is branch a's, channel 9 is branch b's third; fc reads 16 features per channel
    assert plan["a.0.weight"] == [(0, [2])] and plan["a.1.bias"] == [(0, [2])]
    assert plan["b.0.weight"] == [(0, [3])] and plan["b.1.weight"] == [(0, [3])]
    assert plan["dw.0.weight"] == [(0, [2, 9])] and plan["dw.1.bias"] == [(0, [2, 9])]
    assert plan["fc.weight"] == [(1, [*range(32, 48), *range(144, 160)])]


def test_invalid_keep_is_refused() -> None:
    model = ConcatNet()
    x = torch.randn(1, 3, 16, 16)
    spec = analyze(model, x, ignore=["stem"])
    (stem_group,) = [g for g in spec.groups if g.producers == ["stem"]]
    with pytest.raises(StructureError, match="not prunable"):
        slim(model, x, {stem_group.id: 4}, spec=spec)
    group = spec.prunable_groups[0]
    with pytest.raises(StructureError, match="keep at least one index"):
        slim(model, x, {group.id: [0, group.channels]}, spec=spec)
    with pytest.raises(StructureError, match="keep names group"):
        slim(model, x, {len(spec.groups): 1}, spec=spec)


def test_check_equivalent_fails_loudly() -> None:
    torch.manual_seed(0)
    a, b = ConcatNet(), ConcatNet()
    with pytest.raises(StructureError, match="differs from the masked model"):
        check_equivalent(a, b, torch.randn(1, 3, 16, 16))


def test_frozen_batchnorm_is_a_norm_of_its_group_sliced_and_masked_to_zero() -> None:
    """Pretrained detector backbones freeze their BatchNorm statistics as buffers."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from pipeline.slim import mask_entries, mask_plan, zero_entries
    from pipeline.structure import dependency_graph

    torch.manual_seed(0)
    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d, num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):  # a shift that a dropped channel must not leak
            m.bias.uniform_(-1, 1)
            m.running_mean.uniform_(-1, 1)
    x = torch.randn(1, 3, 64, 64)
    spec = analyze(model, x)
    prunable = [g for g in spec.groups if g.prunable]
    assert all(g.norms for g in prunable)
    keep = {g.id: g.channels // 2 for g in prunable}
    slimmed = slim(model, x, keep, spec=spec)  # checked equal to the masked model
    assert slimmed.layer1[0].bn1.weight.numel() == 32 and slimmed.bn1.running_var.numel() == 32
    masked = analyze(slimmed, x)
    assert masked.total_macs < spec.total_macs
    drop = {g.id: list(range(g.channels // 2, g.channels)) for g in prunable}
    entries = mask_entries(model, mask_plan(dependency_graph(model, x), spec, drop))
    assert any(t is model.layer1[0].bn1.bias for t, _, _ in entries)
    zero_entries(entries)
    assert not model.layer1[0].bn1.bias[32:].any() and model.layer1[0].bn1.bias[:32].any()
