"""Weights from memory for compute-bound layers: a factor per table entry for what its packed
points cannot afford to stream.

A compute-bound layer's packed points hold only as many copies as ``MAX_PACKED_MACS`` allows
(often one), so its weights stay in the caches between runs, while inside the network the rest
of the network's weights pass through first. Below ``COLD_INTENSITY`` multiply-accumulates per
weight that costs time: on a Xeon at 1 thread, resnet50's convolutions at 7x7 output ran
1.22-1.25x as long with their weights streamed, at 14x14 1.08x. Streaming the network's weights
at every point would multiply a table's measuring time (resnet18 at 224x224: about 9 s of
running per pass becomes 25 s), so each such entry's full-width point is timed twice, back to
back, in the first pass: with its usual copies ("hot") and with as many as stream the network's
weights within ``COLD_MACS`` ("streamed"). Their ratio (a compute-bound layer's intensity is
the same at every channel count) scales the entry's points: fully where a point's copies
stream no more of the network's weights than the full-width point's do, proportionally less
where they stream more. Each entry's factor is kept in the table's meta (``cold``).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from functools import partial

from ..backends import Backend
from ..onnx_layers import (
    COLD_INTENSITY,
    COLD_MACS,
    COMPUTE_BOUND,
    copies_for,
    intensity,
    layer_params,
)
from ..spec import LayerSpec
from .grid import LutEntry, layer_from_geometry
from .journal import Journal

#: (signature, cin, cout, hot copies, streamed copies): an entry's cold-factor measurement
ColdPoint = typing.Tuple[str, int, int, int, int]


def cold_points(entries: Mapping[str, LutEntry], params: int) -> list[ColdPoint]:
    """The entries of ``entries`` that need a cold factor, each at its layer's full width
    (taken from the example layer, so every shard of a table measures the same point)."""
    out = []
    for sig in sorted(entries):
        layer = layer_from_geometry(entries[sig].layer_example)
        cin, cout = layer.cin, layer.cout
        if not COMPUTE_BOUND <= intensity(layer, cin, cout) < COLD_INTENSITY:
            continue
        hot = copies_for(layer, cin, cout, params)
        streamed = copies_for(layer, cin, cout, params, max_macs=COLD_MACS)
        if streamed > hot:
            out.append((sig, cin, cout, hot, streamed))
    return out


def measure_cold(backend: Backend, entries: Mapping[str, LutEntry], journal: Journal,
                 params: int) -> None:
    """Time each cold point hot and streamed, back to back, unless the journal has them."""
    for sig, cin, cout, hot, streamed in cold_points(entries, params):
        layer = layer_from_geometry(entries[sig].layer_example)
        for role, copies in (("hot", hot), ("streamed", streamed)):
            if role not in journal.cold.get(sig, {}):
                journal.measure({"cold": sig, "role": role, "cin": cin, "cout": cout,
                                 "copies": copies},
                                partial(backend.time_layer, layer, cin, cout, copies=copies))


def _share(layer: LayerSpec, cin: int, cout: int, params: int) -> float:
    """How much of the network's ``params`` weights a point's packed copies stream."""
    copies = copies_for(layer, cin, cout, params)
    return min(1.0, copies * layer_params(layer, cin, cout) / params)


def apply_cold(entries: Mapping[str, LutEntry], journal: Journal,
               params: int) -> dict[str, dict[str, typing.Any]]:
    """Scale the measured points of ``entries`` by their entry's cold factor, in place; the
    factors (signature -> factor, copies, point) for the table's meta."""
    factors = {}
    for sig, cin, cout, hot, streamed in cold_points(entries, params):
        pair = journal.cold[sig]
        factor = max(1.0, pair["streamed"].ms / pair["hot"].ms)
        entry = entries[sig]
        layer = layer_from_geometry(entry.layer_example)
        full = _share(layer, cin, cout, params)
        for (ci, co), m in entry.points.items():
            weight = min(1.0, (1.0 - _share(layer, ci, co, params)) / (1.0 - full))
            entry.points[(ci, co)] = m.scaled(1.0 + (factor - 1.0) * weight)
        factors[sig] = {"factor": round(factor, 4), "copies": [hot, streamed],
                        "point": [cin, cout]}
    return factors
