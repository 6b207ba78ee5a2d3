"""The ops priced with a layer, found in real torchvision models and built identically in ONNX
(what ONNX Runtime and TensorRT time) and in torch (what the torch backend times)."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

from pipeline import layer_context
from pipeline.context_ops import ACTIVATIONS
from pipeline.onnx_context import activation_nodes
from pipeline.onnx_layers import layer_inputs, layer_model, packed_model
from pipeline.structure import analyze
from pipeline.torch_layers import torch_layer


def _spec(name: str, size: int = 64):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    return analyze(model, torch.randn(1, 3, size, size), name=name)


def test_resnet_prices_its_stem_pooling_and_classifier_pooling() -> None:
    spec = _spec("resnet18")
    assert spec.layer("conv1").post == [{"op": "maxpool", "kernel": [3, 3], "stride": [2, 2],
                                         "padding": [1, 1], "ceil_mode": False}]
    assert spec.layer("fc").pre == [{"op": "gap", "in_hw": [2, 2]}]
    # residual adds are fused into the convolution that writes them: no context there
    assert not spec.layer("layer1.0.conv2").post and not spec.layer("layer2.0.downsample.0").post
    assert spec.layer("conv1").signature.endswith("|>maxpool3s2p1")


def test_squeeze_and_excitation_is_priced_on_its_two_convolutions() -> None:
    spec = _spec("mobilenet_v3_small")
    fc1, fc2 = spec.layer("features.1.block.1.fc1"), spec.layer("features.1.block.1.fc2")
    assert fc1.pre == [{"op": "gap", "in_hw": [16, 16]}]
    assert fc2.post == [{"op": "act", "fn": "hardsigmoid"},
                        {"op": "mul", "other_hw": [16, 16]}]
    assert fc1.signature != spec.layer("features.4.block.2.fc1").signature  # 4x4 there


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_context_graphs_compute_what_torch_computes(name: str) -> None:
    spec = _spec(name)
    seen = set()
    for layer in spec.layers:
        if not (layer.pre or layer.post) or layer.signature in seen:
            continue
        seen.add(layer.signature)
        cin, cout = layer.dims()
        feeds = layer_inputs(layer, cin, cout)
        sess = ort.InferenceSession(layer_model(layer, cin, cout).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        got = sess.run(["y"], feeds)[0]
        with torch.no_grad():
            want = torch_layer(layer, cin, cout)(torch.from_numpy(feeds["x"])).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4, err_msg=layer.name)
        packed = packed_model(layer, cin, cout, 3)
        ort.InferenceSession(packed.SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, feeds)
    assert seen


class _Branchy(nn.Module):
    """Data-dependent control flow: autograd traces it, torch.fx cannot."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.pool(y) if float(y.mean()) > -1e9 else y


def test_an_untraceable_model_is_analysed_without_context(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pipeline.layer_context"):
        spec = analyze(_Branchy().eval(), torch.randn(1, 3, 8, 8))
    assert spec.layers[0].post == [] and "torch.fx cannot trace" in caplog.text


def test_the_activations_found_in_models_are_the_ones_graphs_build() -> None:
    """The torch-free graph builder (:mod:`pipeline.onnx_context`) and the model tracer name
    the same activations: a traced activation the graphs could not build would fail a table."""
    assert sorted(layer_context.TORCH_ACTIVATIONS) == sorted(ACTIVATIONS)
    for name in ACTIVATIONS:
        nodes, _ = activation_nodes(name, "x", "y")
        assert nodes and nodes[-1].output == ["y"]
