"""The working set each point of a table is measured in: how many weights stream through the
caches between two runs of the layer, inside the network the point belongs to.

A point (cin, cout) is the layer inside a network pruned to about that width. The network's
working set shrinks with it: the calibration's half-width reference keeps a quarter of the
dense network's weights, the quarter-width one a sixteenth. Timing every point with the dense
network's weights streaming past it prices pruned networks as if their weights still came from
as far away as the dense network's do; on a CPU whose last-level cache holds the pruned
network and not the dense one (a 32 MiB L3, resnet34's 87 MB against 22 MB at half width),
that is the difference between DRAM and cache. So each point streams the network's weights
scaled by the share of its layer's weights the point keeps, as if every layer were pruned
alike: ``network × own(cin, cout) / own(full)``, which is about the same number of copies at
every width of a layer (:data:`~pipeline.lut.grid.PROTOCOL` /6).

A layer that holds much of its network's weights (a classifier of a small input) needs a
fraction of a copy more than the whole ones: vgg11_bn's first classifier layer is 1.25 copies
of its working set, and two copies stream 1.6x the weights the network streams, where the
network's pruned forms fit in a large last-level cache and two copies of their layer do not.
Such a point is timed at the whole copies around its working set, and priced between them in
proportion (:meth:`WorkingSets.bracket`).

A signature shared by layers of several widths takes as full the smallest of them that holds
the point (its own layer, where the point lies inside it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..onnx_layers import (
    BRACKET_OVERSHOOT,
    MAX_PACKED_MACS,
    copies_for,
    copies_span,
    layer_params,
)
from ..spec import LayerSpec, NetworkSpec
from .grid import LutEntry, layer_from_geometry, working_set
from .stream_pricing import timed_working_set


class WorkingSets:
    """Per point of ``entries`` (planned for ``spec``): its working set and packed copies."""

    def __init__(self, spec: NetworkSpec, entries: Mapping[str, LutEntry]):
        self.network = working_set(spec)
        self._examples = {sig: layer_from_geometry(e.layer_example) for sig, e in entries.items()}
        #: per signature: (own weights at full width, cin, cout) of each of its layers
        self._fulls = {sig: sorted({self._full(sig, *spec.layer(name).dims()) for name in e.layers})
                       for sig, e in entries.items()}
        #: per signature: the weights its layers hold at full width
        self._weights = {sig: sum(spec.layer(name).params_at(*spec.layer(name).dims())
                                  for name in e.layers) for sig, e in entries.items()}

    def _full(self, sig: str, cin: int, cout: int) -> tuple[int, int, int]:
        return layer_params(self._examples[sig], cin, cout), cin, cout

    def example(self, sig: str) -> LayerSpec:
        """The entry's example layer (its geometry), as the backend times it."""
        return self._examples[sig]

    def fulls(self, sig: str) -> list[list[int]]:
        """(own weights at full width, cin, cout) of each of the entry's layers."""
        return [list(f) for f in self._fulls[sig]]

    def share(self, sig: str) -> float:
        """The share of the network's weights that the entry's layers hold at full width."""
        return self._weights[sig] / max(1, self.network)

    def params(self, sig: str, cin: int, cout: int) -> int:
        """The weights streaming between two runs of the layer at (cin, cout)."""
        return timed_working_set(self.network, self._fulls[sig],
                                 layer_params(self._examples[sig], cin, cout), cin, cout)

    def span(self, sig: str, cin: int, cout: int, max_macs: int = MAX_PACKED_MACS) -> float:
        """Copies of the layer at (cin, cout) that hold its working set, a fraction where the
        layer does not divide it, within ``max_macs`` for a compute-bound layer
        (:func:`~pipeline.onnx_layers.copies_span`)."""
        return copies_span(self._examples[sig], cin, cout, self.params(sig, cin, cout),
                           max_macs=max_macs)

    def copies(self, sig: str, cin: int, cout: int, max_macs: int = MAX_PACKED_MACS) -> int:
        """Whole copies of the layer at (cin, cout) that stream at least its working set, within
        ``max_macs`` for a compute-bound layer (:func:`~pipeline.onnx_layers.copies_for`)."""
        return copies_for(self._examples[sig], cin, cout, self.params(sig, cin, cout),
                          max_macs=max_macs)

    def bracket(self, sig: str, cin: int, cout: int) -> tuple[int, float] | None:
        """(the whole copies below, the share of the way to :meth:`copies`) where rounding up
        overshoots the working set by more than ``BRACKET_OVERSHOOT``: the point is then also
        timed at the copies below and priced between the two, as the working set lies between
        them. None where the usual copies are close enough."""
        span = self.span(sig, cin, cout)
        below = math.floor(span)
        if math.ceil(span) <= span * (1 + BRACKET_OVERSHOOT):
            return None
        return below, span - below
