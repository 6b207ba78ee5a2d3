"""Cold factors: a compute-bound entry's points priced with their weights streamed from memory,
as inside the network, from one hot/streamed pair measured at the entry's full width."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.backends import Measurement, get_backend
from pipeline.kinds import Statistic
from pipeline.lut import journal_path, plan
from pipeline.lut.cold import apply_cold, cold_points, measure_cold
from pipeline.lut.journal import Journal
from pipeline.onnx_layers import COMPUTE_BOUND, copies_for, intensity
from pipeline.structure import analyze


def _entries(params_factor: int = 50):
    """A 3x3 convolution at 7x7 output (49 multiply-accumulates per weight: compute-bound, but
    slowed by weights from memory) in a network of ``params_factor`` times its weights."""
    spec = analyze(nn.Sequential(nn.Conv2d(128, 128, 3, padding=1)), torch.randn(1, 128, 7, 7))
    entries = plan(spec, step=32, max_points=4)
    layer = spec.layers[0]
    return entries, layer, params_factor * layer.params


def _measurement(ms: float) -> Measurement:
    return Measurement(ms, ms, ms, 15, statistic=Statistic.P10)


def test_only_compute_bound_entries_short_of_the_working_set_get_a_cold_point() -> None:
    entries, layer, params = _entries()
    assert COMPUTE_BOUND <= intensity(layer, 128, 128) < 512
    [(_sig, cin, cout, hot, streamed)] = cold_points(entries, params)
    assert (cin, cout) == (128, 128) and hot == copies_for(layer, 128, 128, params)
    assert streamed > hot
    assert cold_points(entries, layer.params) == []  # the layer is the network: already cold
    memory_bound = analyze(nn.Sequential(nn.Linear(256, 256)), torch.randn(1, 256))
    assert cold_points(plan(memory_bound, step=64), 10**9) == []


@pytest.mark.parametrize("streamed_ms, factor", [(1.2, 1.2), (0.9, 1.0)])
def test_the_factor_scales_points_by_how_little_of_the_network_they_stream(
        tmp_path, streamed_ms, factor) -> None:
    entries, layer, params = _entries()
    [(sig, cin, cout, hot, streamed)] = cold_points(entries, params)
    journal = Journal(journal_path(tmp_path / "t.json"), {"header": 1})
    journal.add({"cold": sig, "role": "hot", **_measurement(1.0).to_dict()}, 0.0)
    journal.add({"cold": sig, "role": "streamed", **_measurement(streamed_ms).to_dict()}, 0.0)
    entry = entries[sig]
    entry.points = {k: _measurement(1.0) for k in entry.points}
    meta = apply_cold(entries, journal, params)
    assert meta[sig] == {"factor": factor, "copies": [hot, streamed], "point": [cin, cout]}
    assert entry.points[(cin, cout)].ms == pytest.approx(factor)  # measured there
    shares = {k: min(1.0, copies_for(layer, *k, params) * layer.params * k[0] * k[1]
                     / (128 * 128) / params) for k in entry.points}
    # a point that already streams more of the network (more copies) is scaled less
    for k, m in entry.points.items():
        assert 1.0 <= m.ms <= factor + 1e-12
        if shares[k] <= shares[(cin, cout)]:
            assert m.ms == pytest.approx(factor)


def test_cold_pairs_are_measured_once_and_resumed(tmp_path) -> None:
    entries, _layer, params = _entries()
    backend = get_backend("onnxruntime", threads=1, warmup=1, repeats=3, warmup_ms=0,
                          min_sample_ms=0)
    path = journal_path(tmp_path / "t.json")
    journal = Journal(path, {"header": 1})
    measure_cold(backend, entries, journal, params)
    [(sig, *_)] = cold_points(entries, params)
    assert set(journal.cold[sig]) == {"hot", "streamed"}
    lines = path.read_text().splitlines()
    again = Journal(path, {"header": 1})  # a rerun reads them back and measures nothing
    measure_cold(backend, entries, again, params)
    assert path.read_text().splitlines() == lines
    assert again.cold[sig]["streamed"] == journal.cold[sig]["streamed"]
