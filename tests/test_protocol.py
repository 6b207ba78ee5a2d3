"""The in-network timing protocol: packed copies run for real, weights stream as in a network,
and the calibration check speaks up when the table and the device disagree."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from pipeline.backends import get_backend
from pipeline.backends.timing import interleaved
from pipeline.calibration import SCALE_RANGE, fit
from pipeline.commands.lut import _check_lines
from pipeline.lut import LatencyTable, working_set
from pipeline.onnx_layers import copies_for, layer_input, packed_graph, packed_model
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
    (((10.0, 10.0), (5.0, 3.0), (2.5, 0.6)), "needs scale 1.27"),  # slope off, constant < 0
])
def test_calibration_says_loudly_when_the_table_does_not_fit(points, says, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        cal = fit(*points)
    text = " ".join(cal.warnings)
    assert says in text
    assert SCALE_RANGE[0] <= cal.scale <= SCALE_RANGE[1] and cal.constant_ms >= 0
    assert "rebuild the table on the target" in caplog.text
    table = LatencyTable({"backend": "onnxruntime", "precision": "fp32", "device_key": "cpu-x",
                          "check": cal.to_dict()}, {})
    assert "WARNING: " + cal.warnings[0] in "\n".join(_check_lines(table))

