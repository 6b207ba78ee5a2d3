"""Latency lookup tables built with real ONNX Runtime sessions on real torchvision models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from pipeline.backends import BackendInfo, Measurement, get_backend
from pipeline.cli import main
from pipeline.errors import HalpError, LutError, LutMismatch
from pipeline.lut import (
    LatencyTable,
    LutEntry,
    build_lut,
    journal_path,
    layer_points,
    plan,
)
from pipeline.lut.cold import cold_points
from pipeline.lut.grid import _axis
from pipeline.lut.ladders import HEAVY_SHARE, ladder_rungs
from pipeline.lut.working_sets import WorkingSets
from pipeline.spec import LayerSpec, NetworkSpec
from pipeline.structure import analyze

STEP, MAX_POINTS = 64, 3  # coarse: resnet18 at 32x32 is then 84 points, about a second


def _backend():
    """Real ORT CPU sessions with the fewest samples that still give a median."""
    return get_backend("onnxruntime", threads=1, warmup=1, repeats=3, warmup_ms=0,
                       min_sample_ms=0)


class Interrupting:
    """A real backend that stops as Ctrl-C would after ``limit`` layer measurements, and
    counts the measurements it made."""

    def __init__(self, inner, limit: int | None = None):
        self.inner, self.limit, self.calls = inner, limit, 0
        self.name, self.precision = inner.name, inner.precision

    def describe(self) -> BackendInfo:
        return self.inner.describe()

    def time_layer(self, layer: LayerSpec, cin: int, cout: int,
                   copies: int = 1) -> Measurement:
        if self.limit is not None and self.calls >= self.limit:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner.time_layer(layer, cin, cout, copies=copies)

    def module_timer(self, model: nn.Module, example_input: torch.Tensor):
        return self.inner.module_timer(model, example_input)


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor, NetworkSpec]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    return model, x, analyze(model, x, name="resnet18")


@pytest.fixture(scope="module")
def built(resnet, tmp_path_factory) -> tuple[LatencyTable, Path]:
    model, x, spec = resnet
    out = tmp_path_factory.mktemp("lut") / "resnet18.json"
    table = build_lut(spec, _backend(), step=STEP, max_points=MAX_POINTS, out=out, model=model,
                      example_input=x, progress=False)
    return table, out


# --- building ---------------------------------------------------------------------------------


def test_build_covers_the_network_and_calibrates(built, resnet) -> None:
    table, out = built
    _, _, spec = resnet
    assert out.is_file() and not journal_path(out).exists()
    table.check_spec(spec)
    needed = plan(spec, STEP, MAX_POINTS)
    assert {s: set(e.points) for s, e in table.entries.items()} == \
        {s: set(e.points) for s, e in needed.items()}
    assert table.meta["points"] == sum(len(e.points) for e in needed.values())
    for key in ("backend", "precision", "device", "device_key", "versions", "settings",
                "threads", "created", "batch"):
        assert table.meta[key] is not None, key
    assert table.meta["model"] == "resnet18" and table.meta["input_shape"] == [1, 3, 32, 32]
    # every layer's dense point is measured; scale and constant fit the reference networks
    layers = table.layer_latencies(spec)
    assert all(table.is_measured(lay, *lay.dims()) for lay in spec.layers)
    assert table.dense_ms == Measurement.from_dict(table.meta["dense"]).ms > 0
    assert table.predict(spec) == pytest.approx(sum(layers.values()) + table.constant_ms)
    cal = table.meta["calibration"]
    assert set(cal) == {"dense", "half", "quarter"}
    assert cal["dense"]["measured_ms"] == table.dense_ms
    errors = [table.predict(spec, {int(g): c for g, c in ref["counts"].items()})
              - ref["measured_ms"] for ref in cal.values()]
    check = table.meta["check"]
    assert check["scale"] == table.scale and check["constant_ms"] == table.constant_ms
    assert check["additivity"] == pytest.approx(cal["dense"]["lut_ms"] / table.dense_ms)
    if not check["warnings"]:  # the free line of least relative errors: Σ error / measured² = 0
        assert sum(e / ref["measured_ms"] ** 2 for e, ref in zip(errors, cal.values(),
                                                                  strict=True)) \
            == pytest.approx(0.0, abs=1e-6)
    # the protocol is recorded: how many copies stream the network's weights
    assert table.meta["protocol"]["working_set_params"] == sum(la.params for la in spec.layers)


def test_predict_sums_layers_at_pruned_counts(built, resnet) -> None:
    table, _ = built
    _, _, spec = resnet
    counts = {g.id: max(1, g.channels // 3) for g in spec.prunable_groups}
    layers = table.layer_latencies(spec, counts)
    params = table.working_set(spec, counts)  # layer4 at 1x1 has ladders: priced in it
    assert params is not None
    assert layers == {lay.name: table.latency(lay, *lay.dims(counts), params)
                      for lay in spec.layers}
    assert table.predict(spec, counts) == pytest.approx(sum(layers.values()) + table.constant_ms)


def test_saved_table_round_trips(built) -> None:
    table, out = built
    loaded = LatencyTable.load(out, backend=_backend())
    assert loaded.to_dict() == json.loads(json.dumps(table.to_dict()))


def test_interrupted_build_resumes_with_only_missing_points(resnet, tmp_path) -> None:
    _, _, spec = resnet
    out = tmp_path / "r.json"
    entries = plan(spec, STEP, MAX_POINTS)
    # every point, the cold-factor pair of each anchor that needs one (:mod:`.cold`) and the
    # rungs of the heavy entries' ladders (:mod:`.ladders`: layer4 at 1x1)
    sets = WorkingSets(spec, entries)
    anchors = [a for a in cold_points(entries, sets) if a[4] > a[3]]
    rungs = ladder_rungs(entries, sets)
    assert rungs
    total = sum(len(e.points) for e in entries.values()) + 2 * len(anchors) + len(rungs)
    first = Interrupting(_backend(), limit=20)
    with pytest.raises(KeyboardInterrupt):
        build_lut(spec, first, step=STEP, max_points=MAX_POINTS, out=out, progress=False)
    journal = journal_path(out)
    assert not out.exists()
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 20  # header + one line per finished measurement
    with journal.open("a") as f:  # a crash in the middle of writing the next point
        f.write('{"sig": "conv|k3x3", "ci')
    saved = {(r["sig"], r["cin"], r["cout"]): r["median_ms"]
             for r in map(json.loads, lines[1:]) if "sig" in r}

    second = Interrupting(_backend())
    table = build_lut(spec, second, step=STEP, max_points=MAX_POINTS, out=out, progress=False)
    assert second.calls == total - 20
    kept = {(s, *k): m.median_ms for s, e in table.entries.items() for k, m in e.points.items()
            if (s, *k) in saved}
    assert kept.keys() == saved.keys()
    factors = {s: max(a["factor"] for a in c) for s, c in table.meta["cold"].items()}
    for key, ms in kept.items():  # as journaled; a cold entry's scaled by at most its factor
        assert saved[key] <= ms <= saved[key] * factors.get(key[0], 1.0) * (1 + 1e-9)
        assert ms == saved[key] or key[0] in factors
    assert table.meta["build_s"] > 0 and not journal.exists()

    third = Interrupting(_backend())  # rerun after success: nothing left to measure
    build_lut(spec, third, step=STEP, max_points=MAX_POINTS, out=out, progress=False)
    assert third.calls == 0
    with pytest.raises(LutMismatch, match="delete it or choose another --out"):
        build_lut(spec, third, step=STEP, max_points=MAX_POINTS + 1, out=out, progress=False)


def _classifier_heavy() -> tuple[NetworkSpec, dict[str, LutEntry], WorkingSets]:
    """A small convolution, then a 64→4096 and a 4096→16 linear layer holding nearly all the
    network's weights: its spec, the planned entries (step 16, 3 points) and working sets."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(64, 4096),
                        nn.ReLU(), nn.Linear(4096, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    spec = analyze(net, torch.randn(1, 8, 2, 2))
    entries = plan(spec, step=16, max_points=3)
    return spec, entries, WorkingSets(spec, entries)


def test_a_point_between_two_copy_counts_is_timed_at_both_and_priced_between(tmp_path) -> None:
    """A classifier layer holding most of the network's weights: its working set is about 1.3
    copies of it, so its points are timed with 2 copies and with 1, and priced in proportion;
    an interrupted build measures what it lacks of either."""
    spec, entries, sets = _classifier_heavy()
    head = spec.layer("2").signature
    bracketed = {(sig, *k): sets.bracket(sig, *k) for sig, e in entries.items()
                 for k in e.points if sets.bracket(sig, *k)}
    assert {k for k in bracketed if k[0] == head} == {(head, *k) for k in entries[head].points}
    for point, (below, share) in bracketed.items():
        assert below == sets.copies(*point) - 1 and 0 < share < 1
        assert sets.span(*point) == pytest.approx(below + share)
    assert sets.span(head, 64, 4096) == pytest.approx(sets.network / (64 * 4096 + 4096))

    out = tmp_path / "head.json"
    rungs = len(ladder_rungs(entries, sets))  # timed first in a pass (:mod:`.ladders`)
    total = sum(len(e.points) for e in entries.values()) + len(bracketed) + rungs
    limit = rungs + (total - rungs) // 2
    first = Interrupting(_backend(), limit=limit)
    with pytest.raises(KeyboardInterrupt):
        build_lut(spec, first, step=16, max_points=3, out=out, progress=False)
    second = Interrupting(_backend())
    saved = [json.loads(line) for line in journal_path(out).read_text().splitlines()[1:]]
    table = build_lut(spec, second, step=16, max_points=3, out=out, progress=False)
    assert second.calls == total - limit
    timed = {(r["sig"], r["cin"], r["cout"], bool(r.get("below"))): r for r in saved
             if "sig" in r}  # not the ladders' rungs
    both = [p for p in bracketed if (*p, True) in timed and (*p, False) in timed]
    assert both  # the first run finished some points at both counts
    for point in both:
        below, share = bracketed[point]
        assert timed[(*point, True)]["copies"] == below
        assert timed[(*point, False)]["copies"] == below + 1
        lo, hi = (Measurement.from_dict(timed[(*point, b)]).ms for b in (True, False))
        assert table.entries[point[0]].points[point[1:]].ms == pytest.approx(
            lo + share * (hi - lo))


def test_a_heavy_memory_bound_entry_is_timed_at_a_ladder_of_working_sets(tmp_path) -> None:
    """The classifier's two large linear layers hold nearly all the network's weights and do
    one multiply-accumulate per weight: each is timed at its anchor widths with the copies for
    the network's weights, half of them and so on, journaled and resumed like the points, and
    a network is priced in its own working set from them. The small layers get none."""
    spec, entries, sets = _classifier_heavy()
    rungs = ladder_rungs(entries, sets)
    heavy = {spec.layer(name).signature for name in ("2", "4")}
    assert {r[0] for r in rungs} == heavy
    assert all(sets.share(sig) >= HEAVY_SHARE for sig in heavy)
    assert sets.share(spec.layer("6").signature) < HEAVY_SHARE

    out = tmp_path / "ladders.json"
    total = sum(len(e.points) for e in entries.values()) + len(rungs) + sum(
        1 for sig, e in entries.items() for k in e.points if sets.bracket(sig, *k))
    with pytest.raises(KeyboardInterrupt):  # within the rungs, which open each pass
        build_lut(spec, Interrupting(_backend(), limit=len(rungs) // 2), step=16, max_points=3,
                  out=out, progress=False)
    second = Interrupting(_backend())
    table = build_lut(spec, second, step=16, max_points=3, out=out, progress=False)
    assert second.calls == total - len(rungs) // 2
    streams = table.meta["streams"]
    assert streams["network"] == sets.network and set(streams["entries"]) == heavy
    for sig, curve in streams["entries"].items():
        mine = [r for r in rungs if r[0] == sig]
        assert [tuple(a["point"]) for a in curve["anchors"]] == \
            list(dict.fromkeys((r[1], r[2]) for r in mine))
        for anchor in curve["anchors"]:
            copies = [r[3] for r in mine if [r[1], r[2]] == anchor["point"]]
            assert anchor["params"] == [c * anchor["own"] for c in copies]
            assert copies[0] == 1 and len(copies) > 1 and min(anchor["ms"]) > 0
    # the dense network is priced as its points were timed; a pruned one in its own weights
    assert table.predict(spec) == pytest.approx(
        sum(table.latency(la, *la.dims()) for la in spec.layers))  # no references: no constant
    counts = {spec.layer("2").out_group: 256}
    params = table.working_set(spec, counts)
    assert params == sum(la.params_at(*la.dims(counts)) for la in spec.layers) < sets.network
    head = spec.layer("4")
    assert table.layer_latencies(spec, counts)["4"] == pytest.approx(
        table.latency(head, *head.dims(counts))
        * table.streams.factor(head, *head.dims(counts), params))


def test_journal_of_another_build_is_refused(resnet, tmp_path) -> None:
    _, _, spec = resnet
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        build_lut(spec, Interrupting(_backend(), limit=2), step=STEP, max_points=MAX_POINTS,
                  out=out, progress=False)
    other = get_backend("onnxruntime", threads=2, warmup=1, repeats=3)
    with pytest.raises(LutMismatch, match=r"threads: journal 1, now 2.*delete it"):
        build_lut(spec, other, step=STEP, max_points=MAX_POINTS, out=out, progress=False)
    with pytest.raises(LutMismatch, match=r"step: journal 64, now 32"):
        build_lut(spec, _backend(), step=32, max_points=MAX_POINTS, out=out, progress=False)
    with pytest.raises(HalpError, match="max_points >= 2"):
        build_lut(spec, _backend(), max_points=1, out=tmp_path / "x.json")


class Branches(nn.Module):
    """Two branches concatenated, a depthwise conv, and a flatten feeding a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(40, 32, 1), nn.ReLU())
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fuse(torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(torch.flatten(self.pool(self.dw(y)), 1))


def test_a_thinned_axis_holds_the_reference_networks_widths() -> None:
    """The calibration's half- and quarter-width networks are priced from measured points:
    thinning moves its nearest interior points onto their widths, keeping its size and ends."""
    axis = _axis(512, 0, 16, 8)
    assert len(axis) == 8 and axis[0] == 16 and axis[-1] == 512
    assert {128, 256} <= set(axis) and axis == sorted(axis)
    assert _axis(64, 0, 16, 8) == [16, 32, 48, 64]  # not thinned: every width is there


def test_grid_over_concat_flatten_and_depthwise(tmp_path) -> None:
    model, x = Branches().eval(), torch.randn(1, 3, 8, 8)
    spec = analyze(model, x, ignore=["b.0"], name="branches")  # b's 24 channels become fixed
    layer = {lay.name: lay for lay in spec.layers}
    # concat: fixed 24 + prunable 16 -> cin 24 + 8k up to 40; cout multiples of 8 up to 32
    assert layer_points(layer["fuse.0"], 8) == {(ci, co) for ci in (32, 40)
                                                for co in (8, 16, 24, 32)}
    # flatten -> linear: 4 features per channel of the 32-channel group, classifier fixed
    assert layer_points(layer["fc"], 8) == {(4 * c, 10) for c in (8, 16, 24, 32)}
    assert layer_points(layer["dw"], 8) == {(c, c) for c in (8, 16, 24, 32)}  # diagonal
    assert layer_points(layer["b.0"], 8) == {(3, 24)}  # both sides fixed
    # thinning keeps the smallest and the full count
    assert layer_points(layer["fc"], 8, max_points=2) == {(32, 10), (128, 10)}
    table = build_lut(spec, _backend(), step=8, out=tmp_path / "b.json", model=model,
                      example_input=x, progress=False)
    table.check_spec(spec)
    counts = {g.id: 8 for g in spec.prunable_groups}
    assert all(table.is_measured(lay, *lay.dims(counts)) for lay in spec.layers)


# --- validation -------------------------------------------------------------------------------


def _corrupt(data: dict, how: str) -> object:
    sig = next(iter(data["entries"]))
    if how == "format":
        data["format"] = "something-else"
    elif how == "version":
        data["version"] = 99
    elif how == "old-protocol":
        data["version"] = 1
    elif how == "no-meta-key":
        del data["meta"]["device_key"]
    elif how == "no-entries":
        del data["entries"]
    elif how == "negative":
        data["entries"][sig]["points"][0][2] = -1.0
    elif how == "nan":
        data["entries"][sig]["points"][0][3] = float("nan")
    elif how == "zero-n":
        data["entries"][sig]["points"][0][5] = 0
    elif how == "short-point":
        data["entries"][sig]["points"][0] = [8, 8, 0.1]
    elif how == "list":
        return [data]
    return data


@pytest.mark.parametrize("how, message", [
    ("format", "not a HALP latency table"),
    ("version", "version 99 is not supported"),
    ("old-protocol", "version 1 timed each layer alone"),
    ("no-meta-key", "meta is missing 'device_key'"),
    ("no-entries", "table is missing 'entries'"),
    ("negative", "expected a finite non-negative number"),
    ("nan", "expected a finite non-negative number"),
    ("zero-n", "expected a positive integer"),
    ("short-point", r"is not \[cin, cout, median_ms"),
    ("list", "not a HALP latency table"),
])
def test_malformed_tables_are_refused(built, tmp_path, how, message) -> None:
    _, out = built
    bad = tmp_path / f"{how}.json"
    bad.write_text(json.dumps(_corrupt(json.loads(out.read_text()), how)))
    with pytest.raises(LutError, match=message) as err:
        LatencyTable.load(bad)
    assert str(bad) in str(err.value) and "halp lut build" in str(err.value)


def test_truncated_and_missing_tables_are_refused(built, tmp_path) -> None:
    _, out = built
    bad = tmp_path / "cut.json"
    text = out.read_text()
    bad.write_text(text[: len(text) // 2])
    with pytest.raises(LutError, match=r"cut.json is not valid JSON \(truncated or corrupt"):
        LatencyTable.load(bad)
    with pytest.raises(LutError, match="does not exist"):
        LatencyTable.load(tmp_path / "absent.json")


@pytest.mark.parametrize("wanted, message", [
    ({"backend": "tensorrt"}, "backend='onnxruntime'.*backend='tensorrt' was requested"),
    ({"precision": "fp16"}, "precision='fp32'.*precision='fp16' was requested"),
    ({"device_key": "cuda-nvidia-orin"}, "device_key='cpu-.*'cuda-nvidia-orin' was requested"),
])
def test_tables_for_another_target_are_refused(built, wanted, message) -> None:
    _, out = built
    with pytest.raises(LutMismatch, match=message):
        LatencyTable.load(out, **wanted)
    assert LatencyTable.load(out, allow_mismatch=True, **wanted).entries


def test_check_spec_names_the_first_uncovered_layer(built) -> None:
    table, _ = built
    model = torchvision.models.resnet18().eval()
    bigger = analyze(model, torch.randn(1, 3, 64, 64), name="resnet18")
    with pytest.raises(LutMismatch, match=r"layer conv1 \(conv\|k7x7.*hw64x64.*has no entry"):
        table.check_spec(bigger)
    wide = analyze(torchvision.models.resnet18(num_classes=2000).eval(),
                   torch.randn(1, 3, 32, 32))
    with pytest.raises(LutMismatch, match=r"layer fc queried at cin=512, cout=2000, beyond"):
        table.check_spec(wide)


# --- queries on known values ------------------------------------------------------------------


def _layer(name: str, cin: int, cout: int, op: str = "conv") -> LayerSpec:
    return LayerSpec(name=name, op=op, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                     dilation=(1, 1), groups=cout if op == "dwconv" else 1, in_hw=(8, 8),
                     out_hw=(8, 8), cin=cin, cout=cout, in_group=1, out_group=2,
                     in_sources=[(1, cin)])


def _plane(cin: float, cout: float) -> float:
    """Bilinear in (cin, cout), so bilinear interpolation reproduces it exactly."""
    return 0.01 + 1e-4 * cin + 2e-4 * cout + 1e-6 * cin * cout


def _table(*layers: LayerSpec, f=_plane) -> LatencyTable:
    """A table holding ``f`` at each layer's grid points (step 8), as a build would store it."""
    spec = NetworkSpec(input_shape=(1, 3, 8, 8), layers=list(layers), groups=[],
                       total_params=0, total_macs=0)
    entries = plan(spec, 8)
    for e in entries.values():
        e.points = {k: Measurement(f(*k), f(*k), f(*k), 5) for k in e.points}
    meta = {"backend": "onnxruntime", "precision": "fp32", "device_key": "cpu-test",
            "settings": {}, "threads": 1, "versions": {}, "created": "then", "points": 0}
    return LatencyTable(meta, entries)


def test_exact_on_points_and_bilinear_between() -> None:
    tall, wide = _layer("tall", 32, 64), _layer("wide", 64, 32)  # one signature, L-shaped grid
    table = _table(tall, wide)
    assert table.lookup(wide, 48, 24) == (pytest.approx(_plane(48, 24)), True)
    for layer, cin, cout in [(wide, 52, 20), (tall, 20, 60), (wide, 61, 9), (tall, 8, 63)]:
        ms, exact = table.lookup(layer, cin, cout)
        assert not exact and ms == pytest.approx(_plane(cin, cout)), (cin, cout)
    with pytest.raises(LutMismatch, match="beyond the measured range"):
        table.latency(wide, 48, 60)  # no layer needed this corner: not measured
    with pytest.raises(LutMismatch, match=r"layer other .* has no entry"):
        table.latency(_layer("other", 8, 8, op="dwconv"), 8, 8)


def test_below_the_grid_extrapolates_clamped() -> None:
    layer = _layer("c", 64, 64)
    table = _table(layer)
    ms, exact = table.lookup(layer, 4, 4)
    assert not exact and _plane(8, 8) * 4 / 8 * 4 / 8 <= ms <= _plane(8, 8)
    assert ms == pytest.approx(_plane(4, 4))  # linear below the grid, so exact here
    steep = _table(layer, f=lambda ci, co: 1e-3 * ci * co)  # through 0: clamped at the floor
    assert 0 <= steep.latency(layer, 1, 1) <= steep.latency(layer, 8, 8)


def test_depthwise_is_one_dimensional() -> None:
    dw = _layer("dw", 64, 64, op="dwconv")
    table = _table(dw, f=lambda ci, co: 0.002 * co)
    assert table.lookup(dw, 20, 20) == (pytest.approx(0.04), False)
    assert table.lookup(dw, 24, 24) == (pytest.approx(0.048), True)


def test_merge_unions_shards_and_keeps_the_better_point(built) -> None:
    table, _ = built
    sigs = list(table.entries)
    half = len(sigs) // 2
    a = LatencyTable(dict(table.meta), {s: table.entries[s] for s in sigs[: half + 1]})
    b_entries = {s: LutEntry(table.entries[s].layer_example, list(table.entries[s].layers),
                             dict(table.entries[s].points)) for s in sigs[half:]}
    shared = b_entries[sigs[half]]
    key = next(iter(shared.points))
    better = Measurement(1.0, 0.9, 1.1, shared.points[key].n + 10)
    shared.points[key] = better
    b = LatencyTable(dict(table.meta, device="another box of the same kind"), b_entries)
    merged = a.merge(b)
    assert merged.entries.keys() == table.entries.keys()
    assert merged.entries[sigs[half]].points[key] == better
    assert len(merged.meta["merged_from"]) == 2
    assert merged.constant_ms is None  # neither shard carries one
    assert LatencyTable(dict(table.meta), table.entries, constant_ms=1.5).merge(b).constant_ms \
        == 1.5
    for key_, value in [("precision", "fp16"), ("device_key", "cuda-x"), ("backend", "torch")]:
        with pytest.raises(LutMismatch, match=f"{key_} differs"):
            a.merge(LatencyTable(dict(table.meta, **{key_: value}), b_entries))


# --- command line -----------------------------------------------------------------------------


def test_cli_build_show_plot_merge(tmp_path, capsys) -> None:
    out, png, merged = tmp_path / "cli.json", tmp_path / "stairs.png", tmp_path / "m.json"
    assert main(["lut", "build", "--model", "resnet18", "--input", "1x3x32x32", "--backend",
                 "onnxruntime", "--step", "512", "--threads", "1", "--out", str(out),
                 "--no-progress"]) == 0
    built = capsys.readouterr().out
    assert "calibration scale" in built and "check: raw entries sum to" in built
    assert main(["lut", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    signatures = len(LatencyTable.load(out).entries)
    assert "backend onnxruntime fp32" in shown and f"{signatures} signatures" in shown
    assert main(["lut", "plot", str(out), "--layer", "layer4.1.conv1", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["lut", "merge", str(out), str(out), "-o", str(merged)]) == 0
    assert LatencyTable.load(merged).meta["merged_from"]
    assert main(["lut", "show", str(tmp_path / "absent.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert np.isfinite(LatencyTable.load(out).constant_ms)


REFERENCE_TABLES = sorted((Path(__file__).parent.parent / "luts").glob("*.json"))


@pytest.mark.parametrize("path", REFERENCE_TABLES, ids=lambda p: p.name)
def test_reference_tables_load_and_cover_their_model(path: Path) -> None:
    """The measured tables shipped in luts/ stay readable as the format evolves, and still
    price every layer of the network they were built for."""
    table = LatencyTable.load(path)
    meta = table.meta
    assert meta["device"] and meta["versions"] and table.dense_ms and table.dense_ms > 0
    model = getattr(torchvision.models, meta["model"])()
    batch, *sample = meta["input_shape"]
    data = analyze(model, torch.randn(1, *sample)).to_dict()  # batch 1: quick to trace
    data["input_shape"] = meta["input_shape"]
    data["layers"] = [{**layer, "batch": batch} for layer in data["layers"]]
    spec = NetworkSpec.from_dict(data)
    table.check_spec(spec)
    assert 0.5 * table.dense_ms < table.predict(spec) < 2 * table.dense_ms
