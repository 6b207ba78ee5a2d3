"""Weights from memory for compute-bound layers: a factor per point for what its packed copies
cannot afford to stream.

A compute-bound layer's points hold only as many copies as ``MAX_PACKED_MACS`` allows (often
one at full width), so its weights stay in the caches between runs, while inside the network
the rest of the network's weights pass through first. Below ``COLD_INTENSITY`` multiply-
accumulates per weight that costs time: on a Xeon at 1 thread, resnet50's convolutions at 7x7
output ran 1.22-1.25x as long with their weights streamed, at 14x14 1.08x. Streaming the
working set at every point would multiply a table's measuring time (resnet18 at 224x224: about
9 s of running per pass becomes 25 s), so each such entry is timed at a few anchors, hot (its
usual copies) and streamed (as many as stream the point's working set within ``COLD_MACS``,
:mod:`pipeline.lut.working_sets`), back to back in every pass: at its full width, at half and at
a quarter of it, until the usual copies stream the whole working set. The ratio depends on the
width, not only on the intensity: the working set shrinks with the width, and on the same
Xeon resnet34's 6x6 convolutions ran 1.20x streamed at full width and 1.02x at half width, where
the network's 22 MB pass through the caches that 87 MB overflow. A point's factor is
interpolated between the anchors in log weights. The anchors are kept in the table's meta
(``cold``).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from functools import partial

import numpy as np

from ..backends import Backend
from ..backends.timing import combine
from ..errors import UnsupportedLayer
from ..onnx_layers import (
    COLD_INTENSITY,
    COLD_MACS,
    COMPUTE_BOUND,
    groups_at,
    intensity,
    layer_params,
)
from ..spec import LayerSpec
from .grid import LutEntry
from .journal import Journal
from .working_sets import WorkingSets

#: (signature, cin, cout, hot copies, streamed copies): an anchor of an entry's cold factor;
#: hot == streamed where the usual copies already stream the working set (factor 1, not timed)
ColdPoint = typing.Tuple[str, int, int, int, int]

#: anchors per entry at most: its full width, half and a quarter of it
ANCHORS = 3


def anchor_widths(layer: LayerSpec) -> list[tuple[int, int]]:
    """The anchors' (cin, cout): the layer's full width, then each prunable side halved."""
    cin_varies = layer.in_group is not None or any(g is not None for g, _ in layer.in_sources)
    cout_varies = layer.out_group is not None
    out = []
    for k in range(ANCHORS):
        cin = max(1, layer.cin >> k) if cin_varies else layer.cin
        cout = max(1, layer.cout >> k) if cout_varies else layer.cout
        try:
            groups_at(layer, cin, cout)
        except UnsupportedLayer:  # a grouped convolution keeps its channel counts
            break
        if (cin, cout) in out:
            break
        out.append((cin, cout))
    return out


def cold_points(entries: Mapping[str, LutEntry], sets: WorkingSets) -> list[ColdPoint]:
    """The anchors of the entries of ``entries`` that need a cold factor (taken from the example
    layer, so every shard of a table measures the same anchors)."""
    out = []
    for sig in sorted(entries):
        layer = sets.example(sig)
        if not COMPUTE_BOUND <= intensity(layer, layer.cin, layer.cout) < COLD_INTENSITY:
            continue
        mine: list[ColdPoint] = []
        for cin, cout in anchor_widths(layer):
            hot = sets.copies(sig, cin, cout)
            streamed = sets.copies(sig, cin, cout, max_macs=COLD_MACS)  # >= hot: more MACs
            if streamed == hot and not mine:
                break  # already streams at full width: no factor
            mine.append((sig, cin, cout, hot, streamed))
            if streamed == hot:
                break  # from here on the usual copies stream the working set: factor 1
        out += mine
    return out


def measure_cold(backend: Backend, entries: Mapping[str, LutEntry], journal: Journal,
                 sets: WorkingSets, p: int) -> None:
    """Time each anchor hot and streamed, back to back, in pass ``p``, unless the journal has
    them."""
    for sig, cin, cout, hot, streamed in cold_points(entries, sets):
        if streamed == hot:
            continue
        layer = sets.example(sig)
        for role, copies in (("hot", hot), ("streamed", streamed)):
            if p not in journal.cold.get((sig, cin, cout, role), {}):
                journal.measure({"cold": sig, "role": role, "cin": cin, "cout": cout,
                                 "copies": copies, "pass": p},
                                partial(backend.time_layer, layer, cin, cout, copies=copies))


def apply_cold(entries: Mapping[str, LutEntry], journal: Journal,
               sets: WorkingSets) -> dict[str, list[dict[str, typing.Any]]]:
    """Scale the measured points of ``entries`` by their cold factor, in place; the anchors
    (signature -> [{point, copies, factor}]) for the table's meta."""
    anchors: dict[str, list[dict[str, typing.Any]]] = {}
    for sig, cin, cout, hot, streamed in cold_points(entries, sets):
        factor = 1.0
        if streamed > hot:
            hot_ms, streamed_ms = (combine(list(journal.cold[(sig, cin, cout, role)].values())).ms
                                   for role in ("hot", "streamed"))
            factor = max(1.0, streamed_ms / hot_ms)
        anchors.setdefault(sig, []).append({"point": [cin, cout], "copies": [hot, streamed],
                                            "factor": round(factor, 4)})
    for sig, found in anchors.items():
        layer = sets.example(sig)
        own = [math.log(layer_params(layer, *a["point"])) for a in found][::-1]
        factors = [a["factor"] for a in found][::-1]
        entry = entries[sig]
        for (ci, co), m in entry.points.items():
            x = math.log(layer_params(layer, ci, co))
            entry.points[(ci, co)] = m.scaled(float(np.interp(x, own, factors)))
    return anchors
