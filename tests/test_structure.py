"""Structure analysis on real torchvision models through Torch-Pruning's DependencyGraph."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from pipeline.errors import ModelLoadError, ShapeError, StructureError
from pipeline.models import load_model, parse_shape
from pipeline.spec import NetworkSpec
from pipeline.structure import analyze, trace

NAMED = ["resnet18", "resnet50", "mobilenet_v2", "vgg11_bn", "efficientnet_b0"]
OTHERS = ["densenet121", "googlenet", "regnet_y_400mf", "mnasnet0_5", "squeezenet1_0",
          "mobilenet_v3_small", "alexnet", "resnext50_32x4d", "convnext_tiny"]


def _input(name: str) -> torch.Tensor:
    size = 224 if name in {"alexnet", "vgg11_bn", "squeezenet1_0"} else 96
    return torch.randn(1, 3, size, size)


_cache: dict[str, tuple[nn.Module, NetworkSpec, dict]] = {}


def _analyzed(name: str) -> tuple[nn.Module, NetworkSpec, dict]:
    """Model, its spec, and the (input, output) shapes seen by independent forward hooks."""
    if name not in _cache:
        torch.manual_seed(0)
        model = load_model(name).eval()
        x = _input(name)
        seen: dict[str, tuple] = {}

        def record(name: str):
            def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                seen.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))
            return hook

        hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        _cache[name] = (model, analyze(model, x, name=name), seen)
    return _cache[name]


@pytest.mark.parametrize("name", NAMED + OTHERS)
def test_every_layer_once_with_consistent_channels(name: str) -> None:
    _, spec, seen = _analyzed(name)
    names = [layer.name for layer in spec.layers]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(seen), "each conv/linear that runs appears exactly once"
    for layer in spec.layers:
        if layer.in_group is not None:
            assert spec.group(layer.in_group).prunable
            assert layer.cin == spec.group(layer.in_group).channels * layer.in_expand
        assert layer.cin == layer.in_expand * sum(c for _, c in layer.in_sources)
        if layer.out_group is not None:
            assert layer.cout == spec.group(layer.out_group).channels
            assert layer.name in spec.group(layer.out_group).producers
        assert layer.dims() == (layer.cin, layer.cout)


@pytest.mark.parametrize("name", NAMED + OTHERS)
def test_spatial_sizes_match_forward_pass(name: str) -> None:
    _, spec, seen = _analyzed(name)
    for layer in spec.layers:
        x_shape, y_shape = seen[layer.name]
        if layer.op == "linear":
            assert layer.in_hw == tuple(x_shape[1:-1])
        else:
            assert layer.in_hw == tuple(x_shape[2:])
            assert layer.out_hw == tuple(y_shape[2:])
        assert layer.batch == x_shape[0]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_residual_adds_share_one_group(name: str) -> None:
    model, spec, _ = _analyzed(name)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks = getattr(model, stage)
        last = "conv2" if name == "resnet18" else "conv3"
        feeding = [f"{stage}.{i}.{last}" for i in range(len(blocks))]
        if blocks[0].downsample is not None:
            feeding.append(f"{stage}.0.downsample.0")
        owners = {spec.layer(n).out_group for n in feeding}
        group_ids = {g.id for g in spec.groups if set(feeding) <= set(g.producers)}
        assert len(group_ids) == 1, f"{stage}: residual producers split over {group_ids}"
        # layer4 feeds the classifier only; every other stage's group is prunable
        assert owners == group_ids or owners == {None}


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "mnasnet0_5",
                                  "mobilenet_v3_small", "convnext_tiny"])
def test_depthwise_convs_tie_input_and_output(name: str) -> None:
    _, spec, _ = _analyzed(name)
    dws = [layer for layer in spec.layers if layer.op == "dwconv"]
    assert dws
    for layer in dws:
        assert layer.in_group == layer.out_group
        assert layer.groups == layer.cin == layer.cout


def test_classifier_and_network_input_not_prunable() -> None:
    _, spec, _ = _analyzed("resnet18")
    assert spec.layer("fc").out_group is None
    assert spec.layer("conv1").in_group is None
    assert spec.layer("conv1").in_sources == [(None, 3)]
    assert [g.producers for g in spec.groups if not g.prunable] == [["fc"]]


def test_concat_consumers_list_their_sources() -> None:
    _, spec, _ = _analyzed("densenet121")
    layer = spec.layer("features.denseblock1.denselayer3.conv1")
    assert len(layer.in_sources) == 3  # stem output + two earlier dense layers
    assert sum(c for _, c in layer.in_sources) == layer.cin


def test_grouped_convolutions_are_not_prunable() -> None:
    _, spec, _ = _analyzed("resnext50_32x4d")
    grouped = [layer for layer in spec.layers if layer.op == "conv" and layer.groups > 1]
    assert grouped
    for layer in grouped:
        assert layer.in_group is None and layer.out_group is None
    assert any("grouped convolution" in (g.reason or "") for g in spec.groups)


def test_flatten_into_linear_expands_channels() -> None:
    _, spec, _ = _analyzed("vgg11_bn")
    fc = spec.layer("classifier.0")
    assert fc.in_expand == 49 and fc.in_group is not None
    assert spec.group(fc.in_group).channels == 512


def test_ignore_marks_groups_not_prunable() -> None:
    model = torchvision.models.resnet18()
    spec = analyze(model, torch.randn(1, 3, 64, 64), ignore=["conv1", "layer3.0.conv1"])
    assert spec.layer("conv1").out_group is None
    assert spec.layer("layer1.0.conv2").out_group is None  # coupled to the stem by the adds
    assert spec.layer("layer3.0.conv1").out_group is None
    reasons = {g.reason for g in spec.groups if not g.prunable}
    assert "ignored layer conv1" in reasons
    with pytest.raises(StructureError, match="not modules of the model"):
        analyze(model, torch.randn(1, 3, 64, 64), ignore=["no.such.layer"])


def test_trace_keeps_the_graph_and_finds_the_stem() -> None:
    model = torchvision.models.mobilenet_v2()
    x = torch.randn(1, 3, 64, 64)
    plain, dense_stem = trace(model, x), trace(model, x, ignore_stem=True)
    assert plain.spec == analyze(model, x)
    assert plain.stem == dense_stem.stem == "features.0.0"
    assert dense_stem.spec == analyze(model, x, ignore=["features.0.0"])
    assert plain.spec.layer("features.0.0").out_group is not None
    assert dense_stem.spec.layer("features.0.0").out_group is None
    assert dense_stem.graph.model is model
    assert model.features[0][0] in dense_stem.graph.module2node


def test_macs_params_and_json_round_trip() -> None:
    model = torchvision.models.resnet18()
    spec = analyze(model, torch.randn(1, 3, 224, 224))
    assert abs(spec.total_macs - 1.814e9) / 1.814e9 < 0.01  # the published ResNet-18 figure
    assert spec.total_params == sum(p.numel() for p in model.parameters())
    assert spec.macs() == spec.total_macs
    halved = {g.id: g.channels // 2 for g in spec.prunable_groups}
    assert spec.macs(halved) < 0.45 * spec.total_macs
    again = NetworkSpec.from_json(spec.to_json())
    assert again == spec
    assert json.loads(spec.to_json())["format"] == 1


def test_training_mode_is_restored() -> None:
    model = torchvision.models.resnet18().train()
    analyze(model, torch.randn(1, 3, 64, 64))
    assert model.training


def test_untraceable_model_names_the_op() -> None:
    model = torchvision.models.shufflenet_v2_x0_5()
    with pytest.raises(StructureError, match=r"could not trace .* at op _Reshape"):
        analyze(model, torch.randn(1, 3, 64, 64))


def test_wrong_input_shape_names_the_layer() -> None:
    with pytest.raises(StructureError, match=r"does not run on an input of shape 1x1x64x64 "
                                             r"\(while running layer 'conv1'\)"):
        analyze(torchvision.models.resnet18(), torch.randn(1, 1, 64, 64))


def test_model_loading_errors() -> None:
    with pytest.raises(ModelLoadError, match="Close matches: resnet18"):
        load_model("resnt18")
    with pytest.raises(ModelLoadError, match="no attribute"):
        load_model("torchvision.models:no_such_net")
    assert isinstance(load_model("torchvision.models:resnet18"), nn.Module)
    assert load_model("resnet18", num_classes=10).fc.out_features == 10


def test_saved_module_and_state_dict(tmp_path) -> None:
    model = torchvision.models.resnet18(num_classes=10)
    torch.save(model, tmp_path / "whole.pt")
    assert isinstance(load_model(str(tmp_path / "whole.pt")), nn.Module)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ModelLoadError, match="state_dict, not a model"):
        load_model(str(tmp_path / "weights.pt"))


@pytest.mark.parametrize("text", ["1x3x224", "1x3x224x224"])
def test_parse_shape_accepts(text: str) -> None:
    assert parse_shape(text) == tuple(int(t) for t in text.split("x"))


@pytest.mark.parametrize("text", ["", "224", "1x3x224x", "1x3xAx224", "1x0x224x224", "-1x3"])
def test_parse_shape_rejects(text: str) -> None:
    with pytest.raises(ShapeError):
        parse_shape(text)


@pytest.mark.parametrize(("act", "name"), [(nn.ReLU(), "relu"), (nn.ReLU6(), "relu6"),
                                           (nn.SiLU(), "silu"), (nn.Hardswish(), "hardswish"),
                                           (nn.Identity(), None)])
def test_fused_activation_detected_even_as_last_op(act: nn.Module, name: str | None) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act)
    layer = analyze(model, torch.randn(1, 3, 8, 8)).layers[0]
    assert (layer.act, layer.bias) == (name, True)


class _InputConcat(nn.Module):
    """Concatenates the raw network input with two branches (Torch-Pruning mis-maps this)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.c = nn.Conv2d(43, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.b(x), x], 1))


def test_inconsistent_channel_mapping_is_left_unpruned() -> None:
    spec = analyze(_InputConcat(), torch.randn(1, 3, 8, 8))
    bad = [g for g in spec.groups if "maps a.0 (16 channels)" in (g.reason or "")]
    assert len(bad) == 1 and not bad[0].prunable
    for layer in spec.layers:
        assert layer.cin == sum(c for _, c in layer.in_sources)
        if layer.out_group is not None:
            assert layer.cout == spec.group(layer.out_group).channels


class _SharedHead(nn.Module):
    """A stem, two feature levels, and one head conv run on both (a detector's shared head)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.head = nn.Conv2d(16, 24, 3, padding=1)
        self.out = nn.Conv2d(24, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fine = torch.relu(self.stem(x))
        coarse = torch.relu(self.down(fine))
        return (self.out(torch.relu(self.head(fine))), self.out(torch.relu(self.head(coarse))))


def test_a_module_run_twice_is_a_layer_per_call_pruned_as_one() -> None:
    from pipeline.slim import slim

    model = _SharedHead().eval()
    x = torch.randn(1, 3, 32, 32)
    spec = analyze(model, x)
    head, again = spec.layer("head"), spec.layer("head#1")
    assert (head.in_hw, again.in_hw) == ((32, 32), (16, 16))
    assert (head.in_group, head.out_group) == (again.in_group, again.out_group)
    assert head.out_group is not None and spec.layer("out#1").in_group == head.out_group
    assert (again.act, again.post) == (head.act, head.post)
    assert spec.total_macs == sum(layer.macs for layer in spec.layers)
    assert head.macs == 4 * again.macs
    slimmed = slim(model, x, {head.out_group: 8}, spec=spec)  # checked against the masks
    assert slimmed.head.out_channels == 8 and slimmed.out.in_channels == 8


def test_a_shared_module_is_measured_and_priced_once_per_call(tmp_path) -> None:
    from pipeline.backends import get_backend
    from pipeline.lut import build_lut

    model = _SharedHead().eval()
    x = torch.randn(1, 3, 32, 32)
    spec = analyze(model, x)
    backend = get_backend("onnxruntime", threads=1, warmup=1, repeats=3, warmup_ms=0,
                          min_sample_ms=0)
    lut = build_lut(spec, backend, step=8, max_points=3, out=tmp_path / "shared.json",
                    model=model, example_input=x, progress=False)
    prices = lut.layer_latencies(spec)
    assert set(prices) == {"stem", "down", "head", "head#1", "out", "out#1"}
    assert all(ms > 0 for ms in prices.values())
    signatures = {spec.layer(n).signature for n in ("head", "head#1")}
    assert len(signatures) == 2 and signatures <= set(lut.entries)  # one entry per input size
