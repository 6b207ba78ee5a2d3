"""Cold factors: a compute-bound entry's points priced with their working set streamed from
memory, as inside the network, from hot/streamed pairs measured at a few anchor widths."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.backends import Measurement, get_backend
from pipeline.kinds import Statistic
from pipeline.lut import journal_path, plan
from pipeline.lut.cold import ANCHORS, apply_cold, cold_points, measure_cold
from pipeline.lut.journal import Journal
from pipeline.lut.working_sets import WorkingSets
from pipeline.onnx_layers import COMPUTE_BOUND, intensity
from pipeline.structure import analyze


def _network(head: int = 600):
    """A 3x3 convolution at 7x7 output (49 multiply-accumulates per weight: compute-bound, but
    slowed by weights from memory; its input channels are the network's, not prunable) before a
    classifier of ``head`` outputs holding most of the network's weights (about 26x the
    convolution's at 600)."""
    net = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.Flatten(),
                        nn.Linear(128 * 49, head))
    spec = analyze(net, torch.randn(1, 128, 7, 7))
    entries = plan(spec, step=32, max_points=4)
    return spec, entries, WorkingSets(spec, entries)


def _measurement(ms: float) -> Measurement:
    return Measurement(ms, ms, ms, 15, statistic=Statistic.P10)


def test_anchors_halve_the_width_until_the_usual_copies_stream_the_working_set() -> None:
    spec, entries, sets = _network()
    conv = spec.layers[0]
    assert COMPUTE_BOUND <= intensity(conv, 128, 128) < 512
    anchors = cold_points(entries, sets)
    assert ANCHORS == 3  # only the prunable side is halved
    assert [(a[1], a[2]) for a in anchors] == [(128, 128), (128, 64), (128, 32)]
    assert {a[0] for a in anchors} == {conv.signature}  # the classifier is memory-bound
    hot, streamed = zip(*[(a[3], a[4]) for a in anchors], strict=True)
    assert hot[0] == sets.copies(conv.signature, 128, 128) < streamed[0]
    assert list(hot) == sorted(hot)  # narrower: more of the usual copies fit the MACs
    assert hot[-1] == streamed[-1]  # the last anchor already streams: factor 1, not timed
    # a point streams the network's weights scaled by its share of the layer's
    assert sets.params(conv.signature, 128, 64) == math.ceil(sets.network / 2)
    assert sets.params(conv.signature, 128, 128) == sets.network
    # a network that is little more than the layer: the usual copies stream it already
    _, small, small_sets = _network(head=1)
    assert cold_points(small, small_sets) == []


@pytest.mark.parametrize("streamed_ms, factor", [(1.2, 1.2), (0.9, 1.0)])
def test_points_take_the_factor_interpolated_between_anchors(
        tmp_path, streamed_ms, factor) -> None:
    spec, entries, sets = _network()
    sig = spec.layers[0].signature
    anchors = cold_points(entries, sets)
    journal = Journal(journal_path(tmp_path / "t.json"), {"header": 1})
    timed = [a for a in anchors if a[4] > a[3]]
    for i, (_, cin, cout, _, _) in enumerate(timed):  # widest anchor slowest when streamed
        for role, ms in (("hot", 1.0), ("streamed", 1.0 + (streamed_ms - 1.0) / (i + 1))):
            journal.add({"cold": sig, "role": role, "cin": cin, "cout": cout, "pass": 0,
                         **_measurement(ms).to_dict()}, 0.0)
    entry = entries[sig]
    entry.points = {k: _measurement(1.0) for k in entry.points}
    meta = apply_cold(entries, journal, sets)
    assert [a["point"] for a in meta[sig]] == [[a[1], a[2]] for a in anchors]
    assert meta[sig][0]["factor"] == factor
    assert entry.points[(128, 128)].ms == pytest.approx(factor)  # an anchor: its own factor
    assert entry.points[(128, 32)].ms == pytest.approx(1.0)  # streams already
    between = entry.points[(128, 96)].ms
    assert meta[sig][1]["factor"] <= between <= factor
    for m in entry.points.values():
        assert 1.0 <= m.ms <= factor + 1e-12


def test_cold_pairs_are_measured_once_per_pass_and_resumed(tmp_path) -> None:
    _, entries, sets = _network()
    backend = get_backend("onnxruntime", threads=1, warmup=1, repeats=3, warmup_ms=0,
                          min_sample_ms=0)
    path = journal_path(tmp_path / "t.json")
    journal = Journal(path, {"header": 1})
    measure_cold(backend, entries, journal, sets, 0)
    timed = [a for a in cold_points(entries, sets) if a[4] > a[3]]
    assert len(journal.cold) == 2 * len(timed) and len(timed) >= 1
    lines = path.read_text().splitlines()
    again = Journal(path, {"header": 1})  # a rerun reads them back and measures nothing
    measure_cold(backend, entries, again, sets, 0)
    assert path.read_text().splitlines() == lines
    assert again.cold == journal.cold
    measure_cold(backend, entries, again, sets, 1)  # the next pass times each pair again
    assert all(set(passes) == {0, 1} for passes in again.cold.values())
