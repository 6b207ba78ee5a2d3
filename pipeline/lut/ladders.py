"""Timing the heavy memory-bound entries at a ladder of working sets, so that a query prices
them in the working set of the network it is asked about (:mod:`pipeline.lut.stream_pricing`).

An entry gets ladders when its layers hold at least ``HEAVY_SHARE`` of the network's weights
and do fewer than ``COMPUTE_BOUND`` multiply-accumulates per weight: its time follows where its
weights come from, and it is a large part of the network's. At each anchor width (full, half
and a quarter, as :mod:`pipeline.lut.cold`'s) it is timed with the copies that stream the
network's weights, half of them, a quarter, down to ``1 / 2**(RUNGS - 1)`` or one copy, back
to back in every pass. The rungs are journaled, so an interrupted build resumes them too.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from functools import partial
from typing import Any

from ..backends import Backend
from ..backends.timing import combine
from ..onnx_layers import COMPUTE_BOUND, copies_for, intensity, layer_params
from .cold import anchor_widths
from .grid import LutEntry
from .journal import Journal
from .working_sets import WorkingSets

#: an entry whose layers hold at least this share of the network's weights gets ladders
HEAVY_SHARE = 1 / 32
#: rungs of a ladder: the network's weights, then halved until a 32nd of them
RUNGS = 6

#: (signature, cin, cout, copies): one rung of an entry's ladder at one anchor width
Rung = typing.Tuple[str, int, int, int]


def ladder_rungs(entries: Mapping[str, LutEntry], sets: WorkingSets) -> list[Rung]:
    """The rungs of the entries of ``entries`` that get ladders, from their example layers
    (so every shard of a table measures the same ones), fewest copies first."""
    out = []
    for sig in sorted(entries):
        layer = sets.example(sig)
        if intensity(layer, layer.cin, layer.cout) >= COMPUTE_BOUND \
                or sets.share(sig) < HEAVY_SHARE:
            continue
        for cin, cout in anchor_widths(layer):
            copies = {copies_for(layer, cin, cout, sets.network >> k) for k in range(RUNGS)}
            out += [(sig, cin, cout, c) for c in sorted(copies)]
    return out


def measure_ladders(backend: Backend, entries: Mapping[str, LutEntry], journal: Journal,
                    sets: WorkingSets, p: int) -> None:
    """Time every rung in pass ``p``, unless the journal has it."""
    for sig, cin, cout, copies in ladder_rungs(entries, sets):
        if p not in journal.ladders.get((sig, cin, cout, copies), {}):
            journal.measure({"ladder": sig, "cin": cin, "cout": cout, "copies": copies,
                             "pass": p},
                            partial(backend.time_layer, sets.example(sig), cin, cout,
                                    copies=copies))


def ladder_meta(entries: Mapping[str, LutEntry], journal: Journal,
                sets: WorkingSets) -> dict[str, Any] | None:
    """The ladders as the table keeps them (``meta["streams"]``, read by
    :class:`~pipeline.lut.stream_pricing.StreamCurves`): per entry, its layers' full widths
    and per anchor the weights streamed and the time per copy at each rung; None when no
    entry has ladders."""
    found: dict[str, dict[str, Any]] = {}
    for sig, cin, cout, copies in ladder_rungs(entries, sets):
        entry = found.setdefault(sig, {"fulls": sets.fulls(sig), "anchors": []})
        own = layer_params(sets.example(sig), cin, cout)
        if not entry["anchors"] or entry["anchors"][-1]["point"] != [cin, cout]:
            entry["anchors"].append({"point": [cin, cout], "own": own, "params": [], "ms": []})
        ms = combine(list(journal.ladders[(sig, cin, cout, copies)].values())).ms
        entry["anchors"][-1]["params"].append(copies * own)
        entry["anchors"][-1]["ms"].append(round(ms, 6))
    return {"network": sets.network, "entries": found} if found else None
