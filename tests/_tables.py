"""Latency tables built in memory for tests that must not time anything: real LatencyTable
objects over the points a build would measure, priced by a formula instead of a runtime."""

from __future__ import annotations

import math

from pipeline.backends.timing import Measurement
from pipeline.lut import LatencyTable, plan
from pipeline.spec import NetworkSpec


def mac_table(spec: NetworkSpec, step: int = 8) -> LatencyTable:
    """MAC-like prices, output channels rounded up to blocks of 16 as kernels pay for them,
    plus a per-layer overhead, at the points a build with ``step`` measures."""
    entries = plan(spec, step, max_points=5)
    for entry in entries.values():
        geometry = entry.layer_example
        area = math.prod(geometry["kernel"] or [1]) * math.prod(geometry["out_hw"] or [1])
        for cin, cout in entry.points:
            blocks = math.ceil(cout / 16) * 16
            ms = 0.003 + 2e-9 * area * (blocks if geometry["op"] == "dwconv" else cin * blocks)
            entry.points[(cin, cout)] = Measurement(ms, ms, ms, 5)
    return LatencyTable({"backend": "onnxruntime", "step": step}, entries, constant_ms=0.02)
