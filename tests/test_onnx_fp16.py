"""float16 graphs (what TensorRT fp16 engines are built from): every tensor float16 where the
ONNX schema admits it, and the same numbers as the fp32 graph within fp16 precision, on the
project's real single-layer, packed and exported graphs (ONNX's reference evaluator runs the
float16 ops; ONNX Runtime's CPU provider computes the fp32 reference)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from pipeline.errors import HalpError
from pipeline.export import to_onnx
from pipeline.onnx_fp16 import detached_to_float16, is_float16, to_float16
from pipeline.onnx_layers import layer_inputs, layer_model, packed_graph
from pipeline.spec import LayerSpec
from pipeline.structure import analyze

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16

LAYERS = {  # as tests/test_onnx_layers.py builds them: specs from the real analyzer
    "conv2d": (nn.Conv2d(8, 16, 3, stride=2, padding=1), (1, 8, 11, 11)),
    "dwconv": (nn.Conv2d(12, 12, 3, padding=1, groups=12), (1, 12, 9, 9)),
    "deconv": (nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1), (1, 8, 5, 5)),
    "conv1d": (nn.Conv1d(6, 10, 5, stride=2, padding=2), (1, 6, 33)),
    "linear": (nn.Linear(24, 10), (3, 24)),
    "linear_tokens": (nn.Linear(16, 20), (2, 7, 16)),
}


def spec_of(key: str, **changes: object) -> LayerSpec:
    module, shape = LAYERS[key]
    return dataclasses.replace(analyze(nn.Sequential(module), torch.randn(shape)).layers[0],
                               **changes)


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor's element type: inputs, outputs, initializers and (inferred) intermediates."""
    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in itertools.chain(graph.input, graph.output, graph.value_info)}
    return types | {t.name: t.data_type for t in graph.initializer}


def fp32_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def fp16_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    half = {k: v.astype(np.float16) for k, v in feeds.items()}
    out = ReferenceEvaluator(model).run(None, half)
    assert all(o.dtype == np.float16 for o in out)
    return out


def assert_close_in_fp16(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    """Within what fp16 storage of inputs, weights and outputs allows (~3 significant digits;
    accumulations over a few hundred terms), scaled to each output's magnitude."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and np.isfinite(g).all()
        scale = max(float(np.abs(w).max()), 1e-3)
        np.testing.assert_allclose(g.astype(np.float32), w, rtol=2e-2, atol=1e-2 * scale)


def assert_all_half(model: onnx.ModelProto, keep: frozenset[str] = frozenset()) -> None:
    onnx.checker.check_model(model, full_check=True)
    types = elem_types(model)
    assert not [n for n, t in types.items() if t == FLOAT and n not in keep]
    assert is_float16(model)
    for v in itertools.chain(model.graph.input, model.graph.output):
        assert v.type.tensor_type.elem_type == HALF


@pytest.mark.parametrize(("key", "act"), [
    ("conv2d", "relu6"),         # Clip with min/max initializers
    ("conv2d", "hardsigmoid"),   # float attributes
    ("dwconv", "silu"),
    ("deconv", "hardswish"),
    ("conv1d", None),
    ("linear", "relu"),          # Gemm
    ("linear_tokens", "sigmoid"),  # MatMul + Add
])
def test_single_layer_graphs_become_float16_and_compute_the_same(key: str,
                                                                 act: str | None) -> None:
    layer = spec_of(key, act=act)
    cin, cout = layer.dims()
    model = layer_model(layer, cin, cout)
    half = to_float16(model)
    assert_all_half(half)
    feeds = layer_inputs(layer, cin, cout)
    assert_close_in_fp16(fp16_run(half, feeds), fp32_run(model, feeds))
    assert elem_types(model)["y"] == FLOAT  # the original is not touched


def test_context_graphs_of_a_real_network_become_float16() -> None:
    """The pooling, residual and squeeze-and-excitation ops priced with a layer."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    spec = analyze(net, torch.randn(1, 3, 32, 32), name="mobilenet_v3_small")
    layers = [spec.layer("features.1.block.1.fc1"),  # global average pool before
              spec.layer("features.1.block.1.fc2")]  # hardsigmoid, then a product after
    for layer in layers:
        cin, cout = layer.dims()
        model = layer_model(layer, cin, cout)
        half = to_float16(model)
        assert_all_half(half)
        feeds = layer_inputs(layer, cin, cout)
        assert len(feeds) == len(half.graph.input)
        assert_close_in_fp16(fp16_run(half, feeds), fp32_run(model, feeds))


@pytest.mark.parametrize("outputs", ["one", "all"])
def test_packed_graphs_convert_their_detached_weights_in_memory(outputs: str) -> None:
    layer = spec_of("conv2d", act="relu6", in_hw=(12, 12), out_hw=(6, 6))
    detached = packed_graph(layer, 32, 32, 3, outputs=outputs)
    assert detached.weights  # large weights travel beside the graph
    half = detached_to_float16(detached)
    assert {v.dtype for v in half.weights.values()} == {np.dtype(np.float16)}
    assert {v.dtype for v in detached.weights.values()} == {np.dtype(np.float32)}
    for t in half.model.graph.initializer:
        assert t.data_type == HALF
        assert (t.data_location == TensorProto.EXTERNAL) == (t.name in half.weights)
    embedded = half.embedded()
    assert_all_half(embedded)
    assert len(embedded.graph.output) == (3 if outputs == "all" else 1)
    feeds = layer_inputs(layer, 32, 32)
    assert_close_in_fp16(fp16_run(embedded, feeds), fp32_run(detached.embedded(), feeds))


def test_an_exported_network_becomes_float16_with_fp32_only_slots_kept() -> None:
    """A torch export: folded BatchNorm, Clip, pooling, Flatten/Gemm, and a Resize whose
    ``scales`` the ONNX schema takes as tensor(float) only."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Upsample(scale_factor=2.0, mode="nearest"),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Hardswish(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    x = torch.randn(1, 3, 8, 8)
    model = to_onnx(net, x, check=False)
    assert any(n.op_type == "Resize" for n in model.graph.node)
    half = to_float16(model)
    resize = next(n for n in half.graph.node if n.op_type == "Resize")
    scales = resize.input[2]
    types = elem_types(half)
    assert types[scales] == FLOAT  # Resize takes its scales in float32 only
    assert_all_half(half, keep=frozenset({scales}))
    feeds = {"input": x.numpy()}
    assert_close_in_fp16(fp16_run(half, feeds), fp32_run(model, feeds))
    # already float16: converting again changes nothing
    assert to_float16(half) == half


def test_a_computed_tensor_read_by_an_fp32_only_slot_gets_a_cast() -> None:
    """Resize scales computed in the graph (and a shared fp32/fp16 initializer): the values
    flow in float16 and are cast back where the schema wants float32."""
    two = numpy_helper.from_array(np.array([1.0, 1.0, 2.0, 2.0], np.float32), "two")
    nodes = [helper.make_node("Constant", [], ["one"], value_float=1.0),
             helper.make_node("Mul", ["two", "one"], ["scales"]),
             helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="nearest"),
             helper.make_node("Resize", ["x", "", "two"], ["s"], mode="nearest"),
             helper.make_node("Add", ["r", "s"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", FLOAT, [1, 1, 4, 4])], initializer=[two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    half = to_float16(model)
    ops = [n.op_type for n in half.graph.node]
    assert ops.count("Cast") == 1  # the computed scales; the initializer is kept fp32
    types = elem_types(half)
    assert types["scales"] == HALF and types["two"] == FLOAT and types["two__fp16"] == HALF
    assert_all_half(half, keep=frozenset({"two", "scales__fp32"}))
    feeds = {"x": np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)}
    assert_close_in_fp16(fp16_run(half, feeds), fp32_run(model, feeds))


def test_what_cannot_be_converted_is_a_clear_error() -> None:
    graph = helper.make_graph(
        [helper.make_node("Mystery", ["x"], ["y"], domain="com.example")], "g",
        [helper.make_tensor_value_info("x", FLOAT, [2])],
        [helper.make_tensor_value_info("y", FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    with pytest.raises(HalpError, match=r"no ONNX schema.*build this model at fp32"):
        to_float16(model)
