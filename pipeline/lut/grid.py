"""What a latency table measures: which (cin, cout) points per layer signature, and how.

Entries are keyed by :attr:`LayerSpec.signature` (everything but the channel counts), so layers
of the same geometry share one. Each holds measured points ``(cin, cout) -> Measurement`` on a
grid of multiples of ``step`` over the layer's prunable sides: the channel counts the pruner can
reach. Every point is timed under the packed protocol (:data:`PROTOCOL`), as the layer costs
inside the network rather than alone.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..calibration import REFERENCES, scaled_width
from ..kinds import OpKind
from ..spec import SPEC_FORMAT, LayerSpec, NetworkSpec

if TYPE_CHECKING:
    from ..backends import Measurement

#: how entries are measured, recorded in every table and journal header: each point is copies
#: of the layer with their own weights in one graph, so the weights stream through the caches
#: as they do in the network. /2: the graph's output is one value per channel (no whole-map
#: layout conversion in any run, :func:`~pipeline.onnx_layers.packed_graph`). /5: every copy
#: runs its own prologue (ONNX Runtime had merged the copies' identical poolings into one), and
#: a per-channel product pays the layout conversions the network pays around it (ONNX
#: Runtime's NCHWc on x86). /6: a point streams the working set of a network pruned to its
#: width, not the dense network's (:mod:`pipeline.lut.working_sets`), and compute-bound entries
#: take cold factors at several widths (:mod:`pipeline.lut.cold`). /7: a point whose working
#: set lies well between two whole copy counts is timed at both and priced between them
#: (:meth:`~pipeline.lut.working_sets.WorkingSets.bracket`). /8: heavy memory-bound entries
#: are also timed at a ladder of working sets, so a network is priced in its own
#: (:mod:`pipeline.lut.ladders`, :mod:`pipeline.lut.stream_pricing`). /3 and /4 were measured
#: and dropped (docs/BENCHMARKS.md).
PROTOCOL = "packed-scaled-working-set/8"

Point = typing.Tuple[int, int]


@dataclass
class LutEntry:
    """One layer signature: an example layer (its geometry), the layers using it, its points."""

    layer_example: dict[str, Any]
    layers: list[str] = field(default_factory=list)
    points: dict[Point, Measurement] = field(default_factory=dict)

    @property
    def diagonal(self) -> bool:
        """Depthwise: cin == cout, so the points lie on a line."""
        return self.layer_example.get("op") == OpKind.DWCONV


def _axis(full: int, fixed: int, step: int, max_points: int | None) -> list[int]:
    """Channel counts for one prunable side: ``fixed + k·step`` below ``full``, and ``full``.

    ``fixed`` is the part of a concatenated input no prunable group owns; for a plain layer it
    is 0 and the grid is the multiples of ``step``. ``max_points`` thins the axis evenly,
    keeping the smallest and the full count, and moves the nearest interior points onto the
    widths of the calibration's reference networks (:data:`~pipeline.calibration.REFERENCES`),
    so that the check prices them from measured points rather than interpolated ones:
    between grid points interpolation runs dearer than measurement (a resnet18 at 224x224
    quarter-width network at 1.13x its measured latency, 0.96x with its widths on the grid;
    docs/BENCHMARKS.md).
    """
    values = [*range(fixed + step, full, step), full]
    if max_points is None or len(values) <= max_points:
        return values
    keep = np.unique(np.round(np.linspace(0, len(values) - 1, max_points)).astype(int))
    values = [values[i] for i in keep]
    movable = set(range(1, len(values) - 1))
    for fraction in REFERENCES.values():
        want = fixed + scaled_width(full - fixed, fraction, step)
        if want in values or not movable:
            continue
        nearest = min(movable, key=lambda i: abs(values[i] - want))
        values[nearest] = want
        movable.discard(nearest)
    return sorted(values)


def layer_points(layer: LayerSpec, step: int, max_points: int | None = None) -> set[Point]:
    """The (cin, cout) points a table needs for ``layer``: a grid over its prunable sides."""
    cin_full, cout_full = layer.dims()
    couts = _axis(cout_full, 0, step, max_points) if layer.out_group is not None else [cout_full]
    if layer.op == OpKind.DWCONV:
        return {(c, c) for c in couts}
    sources = layer.in_sources or [(layer.in_group, layer.cin)]
    expand = layer.in_expand if layer.in_sources else 1
    prunable = sum(n for g, n in sources if g is not None)
    fixed = sum(n for g, n in sources if g is None)
    cins = [expand * c for c in _axis(fixed + prunable, fixed, step, max_points)] if prunable \
        else [cin_full]
    return {(ci, co) for ci in cins for co in couts}


def plan(spec: NetworkSpec, step: int = 8, max_points: int | None = None) -> dict[str, LutEntry]:
    """Empty entries per signature of ``spec`` holding the union of its layers' needed points
    (as keys of ``points``, values unset)."""
    entries: dict[str, LutEntry] = {}
    for layer in spec.layers:
        entry = entries.setdefault(layer.signature, LutEntry(layer_example=_geometry(layer)))
        entry.layers.append(layer.name)
        entry.points.update(dict.fromkeys(layer_points(layer, step, max_points)))
    return entries


def working_set(spec: NetworkSpec) -> int:
    """Parameters of the network's conv/linear layers: the weights that stream through the
    caches between two runs of any one layer of the dense network (what the packed protocol
    scales per point, :mod:`pipeline.lut.working_sets`)."""
    return int(sum(layer.params for layer in spec.layers))


def _geometry(layer: LayerSpec) -> dict[str, Any]:
    """The example layer as stored: everything ``time_layer`` needs to rebuild it."""
    return json.loads(json.dumps(asdict(layer)))


def layer_from_geometry(data: Mapping[str, Any]) -> LayerSpec:
    """The stored example back as a LayerSpec, read by the network spec's own JSON reader."""
    wrapper = {"format": SPEC_FORMAT, "input_shape": [], "layers": [data], "groups": [],
               "total_params": 0, "total_macs": 0}
    return NetworkSpec.from_dict(wrapper).layers[0]
