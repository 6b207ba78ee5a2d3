"""Single-layer ONNX graphs equal the torch layer with the same weights, in a real ORT session."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from torch import nn

from pipeline.backends import get_backend
from pipeline.errors import UnsupportedLayer
from pipeline.onnx_layers import (
    ACTIVATIONS,
    MAX_COPIES,
    copies_for,
    copies_span,
    layer_input,
    layer_model,
    layer_params,
    layer_weights,
    packed_graph,
    packed_model,
)
from pipeline.spec import LayerSpec
from pipeline.structure import analyze
from pipeline.torch_layers import torch_layer

# (module, example input): the layer specs come from the real analyzer
LAYERS = {
    "conv2d": (nn.Conv2d(8, 16, 3, stride=2, padding=1), (1, 8, 11, 11)),
    "conv2d_nobias_dilated": (nn.Conv2d(8, 12, 3, padding=2, dilation=2, bias=False),
                              (2, 8, 9, 9)),
    "grouped": (nn.Conv2d(8, 16, 3, padding=1, groups=4), (1, 8, 7, 7)),
    "dwconv": (nn.Conv2d(12, 12, 3, padding=1, groups=12), (1, 12, 9, 9)),
    "conv1d": (nn.Conv1d(6, 10, 5, stride=2, padding=2), (1, 6, 33)),
    "conv3d": (nn.Conv3d(4, 6, 3, padding=(1, 0, 1)), (1, 4, 5, 6, 7)),
    "deconv": (nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1), (1, 8, 5, 5)),
    "linear": (nn.Linear(24, 10), (3, 24)),
    "linear_tokens": (nn.Linear(16, 20), (2, 7, 16)),
}


def spec_of(key: str) -> LayerSpec:
    module, shape = LAYERS[key]
    return analyze(nn.Sequential(module), torch.randn(shape)).layers[0]


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def assert_matches_torch(layer: LayerSpec, cin: int, cout: int) -> None:
    model = layer_model(layer, cin, cout, seed=3)
    onnx.checker.check_model(model, full_check=True)
    x = layer_input(layer, cin, seed=3)
    got = ort_run(model, x)
    with torch.no_grad():
        want = torch_layer(layer, cin, cout, seed=3)(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", sorted(LAYERS))
def test_op_kinds_match_torch_at_spec_and_pruned_counts(key: str) -> None:
    layer = spec_of(key)
    assert_matches_torch(layer, layer.cin, layer.cout)
    if layer.op == "dwconv":
        assert_matches_torch(layer, 4, 4)
    elif layer.groups == 1:
        assert_matches_torch(layer, max(1, layer.cin // 2), max(1, layer.cout - 3))


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("key", ["conv2d", "linear_tokens", "deconv"])
def test_each_fused_activation_matches_torch(key: str, act: str) -> None:
    layer = dataclasses.replace(spec_of(key), act=act)
    assert_matches_torch(layer, layer.cin, layer.cout)


def test_graph_shape_opset_and_weights_are_deterministic() -> None:
    layer = spec_of("conv2d")
    model = layer_model(layer, 8, 16)
    assert [o.version for o in model.opset_import] == [17]
    assert model.ir_version <= onnx.IR_VERSION
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 16, *layer.out_hw]
    a, b = layer_weights(layer, 8, 16, seed=1), layer_weights(layer, 8, 16, seed=1)
    assert set(a) == {"weight", "bias"}
    np.testing.assert_array_equal(a["weight"], b["weight"])
    assert not np.array_equal(a["weight"], layer_weights(layer, 8, 16, seed=2)["weight"])
    no_bias = layer_weights(spec_of("conv2d_nobias_dilated"), 8, 12)
    assert set(no_bias) == {"weight"}


def test_impossible_counts_and_unknown_kinds_are_refused() -> None:
    with pytest.raises(UnsupportedLayer, match="cin == cout"):
        layer_model(spec_of("dwconv"), 8, 4)
    with pytest.raises(UnsupportedLayer, match="groups=4"):
        layer_model(spec_of("grouped"), 6, 16)
    with pytest.raises(UnsupportedLayer, match="activation 'gelu'"):
        layer_model(dataclasses.replace(spec_of("conv2d"), act="gelu"), 8, 16)
    with pytest.raises(UnsupportedLayer, match="op 'pool'"):
        layer_model(dataclasses.replace(spec_of("conv2d"), op="pool"), 8, 16)


# --- packed graphs (the in-network protocol) ---------------------------------------------------


def test_packed_copies_own_their_weights_and_compute_the_layer() -> None:
    layer = spec_of("conv2d")
    packed = packed_model(layer, 8, 16, 5)
    onnx.checker.check_model(packed, full_check=True)
    weights = [t for t in packed.graph.initializer if t.name.endswith("weight")]
    assert len(weights) == 5 and len({t.raw_data for t in weights}) == 5  # nothing to share
    assert [o.name for o in packed.graph.output] == ["y"]  # the others stay inside the graph
    x = layer_input(layer, 8)
    alone = ort_run(layer_model(layer, 8, 16), x)
    # the output is one value per channel of the first copy's, so no run converts a whole map
    np.testing.assert_allclose(ort_run(packed, x), alone[:, :, :1, :1], rtol=1e-5, atol=1e-6)
    every = packed_model(layer, 8, 16, 3, outputs="all")
    assert [o.name for o in every.graph.output] == ["y", "y_1", "y_2"]
    np.testing.assert_allclose(ort_run(every, x), alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="copies must be >= 1"):
        packed_model(layer, 8, 16, 0)


def test_detached_weights_run_from_memory_like_the_embedded_model() -> None:
    """The table's fast path: ONNX Runtime takes a packed graph's weights from memory instead of
    from the protobuf, and computes what the self-contained model computes."""
    layer = spec_of("conv2d")
    graph = packed_graph(layer, 32, 64, 4)
    detached = [t for t in graph.model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert len(detached) == 4 and set(graph.weights) == {t.name for t in detached}
    assert graph.model.ByteSize() < 10_000  # no weight bytes inside
    x = layer_input(layer, 32)
    backend = get_backend("onnxruntime", threads=1)
    sess = backend._session(graph.model.SerializeToString(), graph.weights)
    np.testing.assert_array_equal(sess.run(["y"], {"x": x})[0],
                                  ort_run(packed_model(layer, 32, 64, 4), x))


def test_copies_stream_the_network_working_set_within_limits() -> None:
    layer = dataclasses.replace(spec_of("conv2d"), in_hw=(2, 2), out_hw=(1, 1))
    own = layer_params(layer, 8, 16)
    assert own == 16 * 8 * 9 + 16
    assert copies_for(layer, 8, 16, working_set=10 * own) == 10
    assert copies_for(layer, 8, 16, working_set=own // 2) == 1
    assert copies_for(layer, 8, 16, working_set=10**9) == MAX_COPIES
    big = dataclasses.replace(layer, in_hw=(512, 512), out_hw=(256, 256))  # compute-bound
    assert copies_for(big, 8, 16, working_set=10**9) == 1
    # the span keeps the fraction that the whole copies round up
    assert copies_span(layer, 8, 16, working_set=5 * own // 4) == pytest.approx(1.25)
    assert copies_for(layer, 8, 16, working_set=5 * own // 4) == 2
    assert copies_span(big, 8, 16, working_set=10**9) == 1.0
