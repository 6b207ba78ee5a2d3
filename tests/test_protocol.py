"""The in-network timing protocol: packed copies run for real, weights stream as in a network,
and the calibration check speaks up when the table and the device disagree."""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from pipeline.backends import Measurement, get_backend
from pipeline.backends.onnxruntime import PACKED_DISABLED_OPTIMIZERS, cpu_blocks_feature_maps
from pipeline.backends.timing import interleaved
from pipeline.calibration import CONSTANT_FLOOR, SCALE_RANGE, fit
from pipeline.commands.lut import _check_lines
from pipeline.kinds import Statistic
from pipeline.lut import LatencyTable, working_set
from pipeline.onnx_layers import (
    copies_for,
    fixed_part,
    layer_input,
    layer_inputs,
    packed_graph,
    packed_model,
)
from pipeline.structure import analyze

FAST = {"warmup": 1, "repeats": 5, "warmup_ms": 0.0}


def test_onnxruntime_runs_every_packed_copy() -> None:
    """Copies whose outputs nobody reads must still run, or the protocol times one copy."""
    layer = analyze(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)),
                    torch.randn(1, 64, 8, 8)).layers[0]
    backend = get_backend("onnxruntime", threads=1, **FAST)
    x = {"x": layer_input(layer, 64)}
    # interleaved rounds, fastest kept: a slow spell of a shared host hits both alike
    one, sixteen = (m.ms for m in interleaved(
        [backend.onnx_timer(packed_model(layer, 64, 64, n), x) for n in (1, 16)], rounds=3))
    assert sixteen > 8 * one


def test_a_layer_is_priced_as_inside_a_network_whose_weights_exceed_the_cache() -> None:
    """32 square linear layers of 1 MiB each: alone, a layer's weights stay in the core's own
    cache between runs (about 3x faster on the CI host); in the network the other 31 MiB pass
    through first. The packed measurement must match the network's per-layer time."""
    width, depth = 512, 32
    torch.manual_seed(0)
    with torch.no_grad():
        net = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).eval()
    x = torch.randn(1, width)
    spec = analyze(net, x)
    layer = spec.layers[1]
    backend = get_backend("onnxruntime", threads=1, **FAST)
    copies = copies_for(layer, width, width, working_set(spec))
    assert copies == depth
    graph = packed_graph(layer, width, width, copies)  # as a table build times it
    inputs = {"x": layer_input(layer, width)}
    packed_m, network_m = interleaved([backend.detached_timer(graph, inputs),
                                       backend.module_timer(net, x)], rounds=3)
    packed, in_network = packed_m.ms / copies, network_m.ms / depth
    lone = backend.time_layer(layer, width, width).ms
    logging.getLogger(__name__).info("per layer: packed %.4f ms, network %.4f ms, alone %.4f ms",
                                     packed, in_network, lone)
    assert packed == pytest.approx(in_network, rel=0.30), (packed, in_network, lone)


def test_calibration_accepts_a_small_correction_silently(caplog) -> None:
    cal = fit((10.0, 10.5), (5.0, 5.4), (2.5, 2.8))
    assert SCALE_RANGE[0] <= cal.scale <= SCALE_RANGE[1] and cal.constant_ms >= 0
    assert cal.warnings == () and cal.additivity == pytest.approx(10 / 10.5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("points, says", [
    (((4.0, 10.0), (2.0, 5.0), (1.0, 2.5)), "sum to 40%"),  # entries far too cheap
    (((1.0, 0.5), (0.5, 0.4), (0.25, 0.35)), "sum to 200%"),  # tiny layers over-priced
    (((10.0, 10.0), (5.0, 3.0), (2.5, 0.6)), "needs scale 1.09"),  # slope off, constant < 0
])
def test_calibration_says_loudly_when_the_table_does_not_fit(points, says, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        cal = fit(*points)
    text = " ".join(cal.warnings)
    assert says in text
    assert SCALE_RANGE[0] <= cal.scale <= SCALE_RANGE[1]
    assert cal.constant_ms >= -CONSTANT_FLOOR * points[0][1]
    assert "rebuild the table on the target" in caplog.text
    table = LatencyTable({"backend": "onnxruntime", "precision": "fp32", "device_key": "cpu-x",
                          "check": cal.to_dict()}, {})
    assert "WARNING: " + cal.warnings[0] in "\n".join(_check_lines(table))



def test_a_refused_fit_keeps_the_best_line_the_bounds_allow() -> None:
    """resnet18 at 1x3x32x32 (2026-11-30): the references' entries and measurements needed a
    constant of -0.032 ms. The bounded line keeps the constant at the floor and refits the
    scale: no line inside the bounds fits the references better, and every line through zero
    (what the fallback used to take) fits them worse."""
    refs = ((0.80, 0.878), (0.27, 0.27), (0.085, 0.064))  # (Σ entries, measured): dense first
    cal = fit(*refs)
    floor = -CONSTANT_FLOOR * refs[0][1]
    assert cal.constant_ms == pytest.approx(floor) and cal.warnings

    def loss(scale: float, constant: float) -> float:
        return sum(((scale * x + constant) / y - 1) ** 2 for x, y in refs)

    through_zero = min(np.linspace(*SCALE_RANGE, 301), key=lambda s: loss(s, 0.0))
    assert loss(cal.scale, cal.constant_ms) < loss(through_zero, 0.0)
    for s in np.linspace(*SCALE_RANGE, 61):  # nothing inside the bounds does better
        for c in np.linspace(floor, 0.05, 41):
            assert loss(cal.scale, cal.constant_ms) <= loss(s, c) + 1e-12


def _ort_graph(backend, model: onnx.ModelProto, weights: dict | None = None,
               disabled: tuple[str, ...] = ()) -> list[onnx.NodeProto]:
    """The nodes ONNX Runtime runs for ``model`` after its optimisations, as the backend sets
    them up."""
    opts = backend._options()
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        if weights:
            opts.add_external_initializers(
                list(weights), [ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()])
        ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                             providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
        return list(onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node)


def _feeds(nodes: list[onnx.NodeProto], op_type: str) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the ``op_type`` node writing it."""
    return {out: n for n in nodes if n.op_type == op_type for out in n.output}


@pytest.mark.skipif(not cpu_blocks_feature_maps(),
                    reason="ONNX Runtime keeps NCHW on this CPU: no conversions to price")
def test_a_squeeze_excitation_point_runs_what_the_network_runs_per_copy() -> None:
    """ONNX Runtime's blocked layout makes the network convert the feature map out of it for the
    SE product and back for the next convolution; every packed copy must pay the same, and
    every copy must run its own pooling of the shared input (none merged away)."""
    net = nn.Sequential(nn.Conv2d(16, 64, 1), nn.SiLU(),
                        nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.SiLU(),
                        SqueezeExcitation(64, 16), nn.Conv2d(64, 24, 1)).eval()
    x = torch.randn(1, 16, 28, 28)
    spec = analyze(net, x)
    backend = get_backend("onnxruntime", threads=1)
    assert backend.blocked_layout

    from pipeline.export import to_onnx

    network = _ort_graph(backend, to_onnx(net, x, check=False))
    product = next(n for n in network if n.op_type == "Mul" and
                   any(i in _feeds(network, "ReorderOutput") for i in n.input))
    assert any(product.output[0] in n.input for n in network if n.op_type == "ReorderInput")

    fc2 = next(la for la in spec.layers if la.post)  # sigmoid, then the product
    graph = packed_graph(fc2, fc2.cin, fc2.cout, 3, blocked=backend.blocked_layout)
    nodes = _ort_graph(backend, graph.model, graph.weights, PACKED_DISABLED_OPTIMIZERS)
    plain = _feeds(nodes, "ReorderOutput")
    products = [n for n in nodes if n.op_type == "Mul"]
    assert len(products) == 3
    for mul in products:  # the map comes out of the blocked layout, per copy
        converted = [plain[i] for i in mul.input if i in plain
                     and plain[i].input[0] in _feeds(nodes, "ReorderInput")]
        assert len(converted) == 1, [n.op_type for n in nodes]

    fc1 = next(la for la in spec.layers if la.pre)  # global pooling, then the squeeze
    graph = packed_graph(fc1, fc1.cin, fc1.cout, 3, blocked=backend.blocked_layout)
    nodes = _ort_graph(backend, graph.model, graph.weights, PACKED_DISABLED_OPTIMIZERS)
    assert sum(n.op_type == "GlobalAveragePool" for n in nodes) == 3


@pytest.mark.parametrize("module, shape", [
    (nn.Conv2d(32, 64, 3, padding=1), (1, 32, 14, 14)),
    (nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)), (1, 64, 7, 7)),
    (nn.Linear(64, 10), (1, 64)),
])
def test_the_fixed_part_is_a_packed_run_without_its_copies(module, shape) -> None:
    """What is subtracted from a packed run is what the run does besides the layer: the same
    input conversions and output, so one copy minus the fixed part leaves the layer's nodes."""
    spec = analyze(nn.Sequential(module) if not isinstance(module, nn.Sequential) else module,
                   torch.randn(shape))
    layer = spec.layers[0]
    backend = get_backend("onnxruntime", threads=1)
    inputs = layer_inputs(layer, layer.cin, layer.cout)
    graph = packed_graph(layer, layer.cin, layer.cout, 1, blocked=backend.blocked_layout)
    one = Counter(n.op_type for n in _ort_graph(backend, graph.model, graph.weights,
                                                PACKED_DISABLED_OPTIMIZERS))
    fixed = Counter(n.op_type for n in _ort_graph(backend,
                                                 fixed_part(layer, layer.cin, layer.cout)))
    fixed.pop("Identity", None)  # a linear layer's: ONNX Runtime keeps it as the graph's output
    # and the fixed part's one-value-per-channel output, which a classifier's packed graph
    # does not need (its own output is small)
    layer_ops = {"Conv", "Gemm", "FusedConv", "FusedGemm", "GlobalAveragePool", "Flatten",
                 "MaxPool"}
    assert set((one - fixed) + (fixed - one)) <= layer_ops, (one, fixed)
    assert backend.fixed_cost(layer, layer.cin, layer.cout, inputs) > 0
    assert len(backend._fixed) == 1  # measured once per input shape
    backend.fixed_cost(layer, layer.cin, layer.cout, inputs)
    assert len(backend._fixed) == 1


def test_a_fixed_cost_never_takes_a_measurement_below_a_tenth() -> None:
    m = Measurement(1.0, 0.8, 1.5, 15, statistic=Statistic.P10)
    assert m.less(0.3) == Measurement(0.7, 0.5, 1.2, 15, statistic=Statistic.P10)
    assert m.less(5.0).ms == pytest.approx(0.08)
