"""Pricing a memory-bound layer in the working set of the network it is queried in.

A table point is timed with the working set of a network pruned uniformly to the point's width
(:mod:`pipeline.lut.working_sets`). A plan is not uniform: on alexnet at 96x96 (228 MB of
weights) the knapsack cut the first classifier layer's input to a sixteenth and kept the second
whole. That network's weights were 76 MB, and its 65 MB layer had been timed streaming the
221 MB a uniform network of its width would hold: cold, where in the network it ran from this
Xeon's cache (2.54 ms predicted, 1.66 ms measured; docs/BENCHMARKS.md).

So the entries that matter most here, the heavy memory-bound ones, are also timed at a ladder
of working sets at a few widths (:mod:`pipeline.lut.ladders`), and a query that names the
working set of the network it prices scales the point by the entry's time per copy in that
working set over its time in the one the point was timed in. More weights never come from
nearer, so each ladder is made non-decreasing before it is read: a noisy rung cannot make a
larger network cheaper. Torch- and onnx-free, like every query.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..spec import LayerSpec, NetworkSpec


def timed_working_set(network: int, fulls: Sequence[Sequence[int]], own: int, cin: int,
                      cout: int) -> int:
    """The weights a point streamed when it was timed: the network's, scaled by the share of
    its layer's weights that the point keeps (``fulls``: the layers of its entry at full
    width; the smallest holding the point is its layer, the largest where none holds it)."""
    holding = [full for full, ci, co in fulls if cin <= ci and cout <= co]
    full = min(holding) if holding else max(full for full, _, _ in fulls)
    return max(1, math.ceil(network * own / max(1, full)))


def network_params(spec: NetworkSpec, counts: Mapping[int, int] | None = None) -> int:
    """The weights of ``spec``'s layers when each group keeps ``counts[group]`` channels: what
    streams through the caches between two runs of any one of them."""
    return sum(layer.params_at(*layer.dims(counts)) for layer in spec.layers)


def non_decreasing(values: Sequence[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pooling adjacent violators)."""
    pools: list[list[float]] = []  # [sum, count]
    for v in values:
        pools.append([v, 1])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
            total, n = pools.pop()
            pools[-1][0] += total
            pools[-1][1] += n
    return [total / n for total, n in pools for _ in range(int(n))]


class _Curve:
    """One entry's ladders: per anchor width, its time per copy against the working set."""

    def __init__(self, data: Mapping[str, Any]):
        self.fulls = [tuple(f) for f in data["fulls"]]
        anchors = sorted(data["anchors"], key=lambda a: a["own"])
        self._own = np.log([a["own"] for a in anchors])
        self._ladders = [(np.log(a["params"]), np.asarray(non_decreasing(a["ms"])))
                         for a in anchors]

    def ratio(self, own: int, timed: int, params: int) -> float:
        """Time per copy in ``params`` over that in ``timed``, for a layer of ``own`` weights:
        read off each anchor's ladder (in log weights, flat beyond its ends) and interpolated
        between the anchors in log own weights."""
        at, to = math.log(max(1, timed)), math.log(max(1, params))
        ratios = [float(np.interp(to, x, ms) / np.interp(at, x, ms)) for x, ms in self._ladders]
        return float(np.interp(math.log(max(1, own)), self._own, ratios))


class StreamCurves:
    """The table's ladders (``meta["streams"]``): the factor that moves a point from the
    working set it was timed in to the one of the network it is priced in."""

    def __init__(self, streams: Mapping[str, Any] | None):
        streams = streams or {}
        self.network = int(streams.get("network") or 0)
        self._curves = {sig: _Curve(c) for sig, c in (streams.get("entries") or {}).items()}

    def __bool__(self) -> bool:
        return bool(self._curves)

    def factor(self, layer: LayerSpec, cin: int, cout: int, params: int) -> float:
        """How much longer ``layer`` at (cin, cout) runs in a network of ``params`` weights than
        its point says; 1 for an entry without ladders."""
        curve = self._curves.get(layer.signature)
        if curve is None:
            return 1.0
        own = layer.params_at(cin, cout)
        return curve.ratio(own, timed_working_set(self.network, curve.fulls, own, cin, cout),
                           params)
