"""Latency lookup tables: what each layer costs on the target at each (cin, cout).

HALP prunes by *measured* latency, so the table is the ground truth the pruner optimises
against. A build can take hours on a Jetson: every finished point goes to a journal and a rerun
of the same build resumes. A table is only valid for the backend, precision and device it was
measured on, and :meth:`LatencyTable.load` refuses it anywhere else unless told otherwise.

Entries are keyed by :attr:`LayerSpec.signature` (everything but the channel counts); each holds
measured points ``(cin, cout) -> Measurement`` on a grid of multiples of ``step``. Queries off the
grid interpolate bilinearly (linearly along the diagonal for depthwise convolutions) and say so.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .backends import Backend, Measurement
from .backends.timing import ROUNDS, STATISTICS, combine
from .calibration import fit, references
from .errors import HalpError, LutError, LutMismatch
from .fsio import (
    append_journal,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_journal,
)
from .onnx_layers import COMPUTE_BOUND, MAX_COPIES, MAX_PACKED_MACS, copies_for
from .progress import progress as progress_bar
from .spec import SPEC_FORMAT, LayerSpec, NetworkSpec

if TYPE_CHECKING:
    from tqdm import tqdm

FORMAT = "halp-lut"
#: 2: entries are packed in-network measurements (:data:`PROTOCOL`); 1 timed layers alone
VERSION = 2
#: how entries are measured, recorded in every table and journal header: each point is
#: ``copies_for(layer, cin, cout, working_set)`` copies of the layer with their own weights
#: in one graph, so the weights stream through the caches as they do in the network
PROTOCOL = "packed-network-working-set"
_JOURNAL_FORMAT = "halp-lut-journal"
_REBUILD = "rebuild it with `halp lut build --model NAME --input SHAPE --backend ... --out FILE`"
#: meta keys that must agree for two tables to be merged (device_key names a device model)
_MERGE_KEYS = ("backend", "precision", "device_key", "settings", "threads", "versions")

log = logging.getLogger(__name__)

Point = tuple[int, int]


@dataclass
class LutEntry:
    """One layer signature: an example layer (its geometry), the layers using it, its points."""

    layer_example: dict[str, Any]
    layers: list[str] = field(default_factory=list)
    points: dict[Point, Measurement] = field(default_factory=dict)

    @property
    def diagonal(self) -> bool:
        """Depthwise: cin == cout, so the points lie on a line."""
        return self.layer_example.get("op") == "dwconv"


# ---------------------------------------------------------------------------------------------
# Which points to measure


def _axis(full: int, fixed: int, step: int, max_points: int | None) -> list[int]:
    """Channel counts for one prunable side: ``fixed + k·step`` below ``full``, and ``full``.

    ``fixed`` is the part of a concatenated input no prunable group owns; for a plain layer it
    is 0 and the grid is the multiples of ``step``. ``max_points`` thins the axis evenly,
    keeping the smallest and the full count.
    """
    values = [*range(fixed + step, full, step), full]
    if max_points is not None and len(values) > max_points:
        keep = np.unique(np.round(np.linspace(0, len(values) - 1, max_points)).astype(int))
        values = [values[i] for i in keep]
    return values


def layer_points(layer: LayerSpec, step: int, max_points: int | None = None) -> set[Point]:
    """The (cin, cout) points a table needs for ``layer``: a grid over its prunable sides."""
    cin_full, cout_full = layer.dims()
    couts = _axis(cout_full, 0, step, max_points) if layer.out_group is not None else [cout_full]
    if layer.op == "dwconv":
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


def _geometry(layer: LayerSpec) -> dict[str, Any]:
    """The example layer as stored: everything ``time_layer`` needs to rebuild it."""
    return json.loads(json.dumps(asdict(layer)))


def _layer_from_geometry(data: Mapping[str, Any]) -> LayerSpec:
    """The stored example back as a LayerSpec, read by the network spec's own JSON reader."""
    wrapper = {"format": SPEC_FORMAT, "input_shape": [], "layers": [data], "groups": [],
               "total_params": 0, "total_macs": 0}
    return NetworkSpec.from_dict(wrapper).layers[0]


# ---------------------------------------------------------------------------------------------
# Querying


class _OutOfRange(Exception):
    """A query above the largest measured channel count of a signature."""


class _Grid:
    """One signature's points as rows of equal cin, each sorted by cout, for fast queries.

    A query interpolates within the two rows bracketing cin (among the rows that reach the
    queried cout) and along cout within each row: bilinear on a rectangular grid, and still
    well defined on the union of several layers' grids. Below the smallest point it extrapolates
    linearly from the two smallest, clamped between proportional scaling of the smallest
    point (latency ∝ channels: no fixed overhead) and the smallest point's value.
    """

    def __init__(self, entry: LutEntry):
        self.diagonal = entry.diagonal
        self.exact = {k: m.ms for k, m in entry.points.items()}
        rows: dict[int, list[tuple[int, float]]] = {}
        for (cin, cout), ms in self.exact.items():
            rows.setdefault(0 if self.diagonal else cin, []).append((cout, ms))
        self.cins = np.array(sorted(rows), dtype=float)
        ordered = [sorted(rows[int(c)]) for c in self.cins]
        self.couts = [np.array([c for c, _ in r], dtype=float) for r in ordered]
        self.ms = [np.array([v for _, v in r], dtype=float) for r in ordered]
        self.top = np.array([c[-1] for c in self.couts])

    def value(self, cin: int, cout: int) -> tuple[float, str]:
        """(ms, "exact" | "interpolated" | "extrapolated"); _OutOfRange above the grid."""
        if self.diagonal:
            cin = cout
        hit = self.exact.get((cin, cout))
        if hit is not None:
            return hit, "exact"
        rows = np.flatnonzero(self.top >= cout)
        if not rows.size or (not self.diagonal and cin > self.cins[rows[-1]]):
            raise _OutOfRange
        if self.diagonal:
            ms, extra = _interp1(self.couts[0], self.ms[0], cout)
            return ms, "extrapolated" if extra else "interpolated"
        pos = int(np.searchsorted(self.cins[rows], cin))
        pick = rows[[pos - 1, pos]] if 0 < pos < rows.size else rows[:2]
        along = [_interp1(self.couts[r], self.ms[r], cout) for r in pick]
        ms, extra = _interp1(self.cins[pick], np.array([v for v, _ in along]), cin)
        extra = extra or any(e for _, e in along)
        return ms, "extrapolated" if extra else "interpolated"

    def span(self) -> tuple[int, int, int, int]:
        """(min cin, max cin, min cout, max cout) over the measured points."""
        keys = np.array(list(self.exact))
        return (int(keys[:, 0].min()), int(keys[:, 0].max()),
                int(keys[:, 1].min()), int(keys[:, 1].max()))


def _interp1(xs: np.ndarray, ys: np.ndarray, x: float) -> tuple[float, bool]:
    """Linear interpolation on sorted ``xs`` (``x <= xs[-1]``); (value, extrapolated below)."""
    if x >= xs[0] or len(xs) == 1:
        return float(np.interp(x, xs, ys)), bool(x < xs[0])
    slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    floor = ys[0] * max(x, 0.0) / xs[0]  # no cheaper than proportional to the channel count
    return float(min(max(ys[0] + slope * (x - xs[0]), floor), ys[0])), True


# ---------------------------------------------------------------------------------------------
# The table


class LatencyTable:
    """Measured per-layer latencies for one backend/precision/device, with the calibration
    against whole networks (:mod:`pipeline.calibration`): queries return ``scale`` × the
    measured entry, and predictions add ``constant_ms`` for what the entries do not cover."""

    def __init__(self, meta: dict[str, Any], entries: Mapping[str, LutEntry], *,
                 constant_ms: float | None = None, dense_ms: float | None = None,
                 scale: float = 1.0, path: str | Path | None = None):
        self.meta = meta
        self.entries = dict(entries)
        self.constant_ms = constant_ms
        self.dense_ms = dense_ms
        self.scale = scale
        self.path = Path(path) if path is not None else None
        self._grids: dict[str, _Grid] = {}
        self._query = lru_cache(maxsize=1 << 16)(self._value)

    # -- queries -----------------------------------------------------------------------------

    def _grid(self, signature: str) -> _Grid:
        grid = self._grids.get(signature)
        if grid is None:
            grid = self._grids[signature] = _Grid(self.entries[signature])
        return grid

    def _value(self, signature: str, cin: int, cout: int) -> tuple[float, str]:
        return self._grid(signature).value(cin, cout)

    def _where(self) -> str:
        return str(self.path) if self.path else "latency table"

    def _classify(self, layer: LayerSpec, cin: int, cout: int) -> tuple[float, str]:
        sig = layer.signature
        if sig not in self.entries:
            raise LutMismatch(
                f"{self._where()}: layer {layer.name} ({sig}) has no entry: the table was built "
                f"for {self._built_for()}; build one for this model with `halp lut build`"
            )
        try:
            return self._query(sig, int(cin), int(cout))
        except _OutOfRange:
            lo_in, hi_in, lo_out, hi_out = self._grid(sig).span()
            raise LutMismatch(
                f"{self._where()}: layer {layer.name} queried at cin={cin}, cout={cout}, beyond "
                f"the measured range (cin {lo_in}..{hi_in}, cout {lo_out}..{hi_out}) of {sig}; "
                f"the table was built for {self._built_for()}: build one for this model with "
                "`halp lut build`"
            ) from None

    def _built_for(self) -> str:
        shape = self.meta.get("input_shape")
        return f"{self.meta.get('model') or 'another model'}" + (
            f" @ {'x'.join(map(str, shape))}" if shape else "")

    def lookup(self, layer: LayerSpec, cin: int, cout: int) -> tuple[float, bool]:
        """(ms, exact): exact is False when the value was interpolated or extrapolated."""
        ms, kind = self._classify(layer, cin, cout)
        return self.scale * ms, kind == "exact"

    def latency(self, layer: LayerSpec, cin: int, cout: int) -> float:
        """Milliseconds for ``layer`` at (cin, cout), calibrated (``scale`` × the entry)."""
        return self.scale * self._classify(layer, cin, cout)[0]

    def is_measured(self, layer: LayerSpec, cin: int, cout: int) -> bool:
        return self.lookup(layer, cin, cout)[1]

    def layer_latencies(self, spec: NetworkSpec, counts: Mapping[int, int] | None = None, *,
                        calibrated: bool = True) -> dict[str, float]:
        """Per layer name: its latency when each group keeps ``counts[group]`` channels
        (``calibrated=False``: the measured entries, without the calibration scale)."""
        scale = self.scale if calibrated else 1.0
        return {layer.name: scale * self._classify(layer, *layer.dims(counts))[0]
                for layer in spec.layers}

    def predict(self, spec: NetworkSpec, counts: Mapping[int, int] | None = None) -> float:
        """Whole-network milliseconds: Σ layer latencies + the calibration constant."""
        return sum(self.layer_latencies(spec, counts).values()) + (self.constant_ms or 0.0)

    def check_spec(self, spec: NetworkSpec) -> None:
        """LutMismatch naming the first layer whose signature is missing or whose full channel
        counts lie outside the measured range; call before pruning with a table."""
        for layer in spec.layers:
            cin, cout = layer.dims()
            if self._classify(layer, cin, cout)[1] == "extrapolated":
                lo_in, _, lo_out, _ = self._grid(layer.signature).span()
                raise LutMismatch(
                    f"{self._where()}: layer {layer.name} has cin={cin}, cout={cout}, below the "
                    f"measured range (cin from {lo_in}, cout from {lo_out}) of "
                    f"{layer.signature}; build a table for this model with `halp lut build`"
                )

    # -- combining ---------------------------------------------------------------------------

    def merge(self, other: LatencyTable) -> LatencyTable:
        """Union of two shards measured on devices of the same kind with the same settings.

        A point in both keeps the measurement with more samples, then the smaller spread. The
        calibration constant (which belongs to ``meta['model']``) is this table's, or the
        other's when this one has none.
        """
        for key in _MERGE_KEYS:
            mine, theirs = self.meta.get(key), other.meta.get(key)
            if mine != theirs:
                raise LutMismatch(
                    f"cannot merge {other._where()} into {self._where()}: {key} differs "
                    f"({theirs!r} vs {mine!r}); merge only shards built with the same backend, "
                    "precision and settings on devices of the same kind"
                )
        entries = {sig: LutEntry(dict(e.layer_example), list(e.layers), dict(e.points))
                   for sig, e in self.entries.items()}
        for sig, theirs in other.entries.items():
            entry = entries.setdefault(sig, LutEntry(dict(theirs.layer_example)))
            entry.layers.extend(n for n in theirs.layers if n not in entry.layers)
            for key, m in theirs.points.items():
                if key not in entry.points or _better(m, entry.points[key]):
                    entry.points[key] = m
        source = self if self.constant_ms is not None or other.constant_ms is None else other
        meta = {**self.meta, **{k: source.meta.get(k)
                                for k in ("model", "input_shape", "dense", "calibration")}}
        meta["merged_from"] = [*_provenance(self.meta), *_provenance(other.meta)]
        meta["created"] = _now()
        meta["points"] = sum(len(e.points) for e in entries.values())
        return LatencyTable(meta, entries, constant_ms=source.constant_ms,
                            dense_ms=source.dense_ms, scale=source.scale)

    # -- persistence -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "meta": self.meta,
            "constant_ms": self.constant_ms,
            "scale": self.scale,
            "dense_ms": self.dense_ms,
            "entries": {
                sig: {
                    "layer_example": e.layer_example,
                    "layers": e.layers,
                    "points": [[ci, co, m.median_ms, m.p10_ms, m.p90_ms, m.n]
                               for (ci, co), m in sorted(e.points.items())],
                }
                for sig, e in self.entries.items()
            },
        }

    def check_backend(self, described: Mapping[str, Any]) -> None:
        """Refuse a table measured with another backend, precision or device than
        ``described`` (a Backend.describe() dict; None values are not checked)."""
        wanted = {k: described.get(k) for k in ("backend", "precision", "device_key")}
        wrong = {k: v for k, v in wanted.items() if v is not None and self.meta[k] != v}
        if wrong:
            have = ", ".join(f"{k}={self.meta[k]!r}" for k in wrong)
            want = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
            raise LutMismatch(
                f"{self._where()} was measured with {have} (device: {self.meta.get('device')}), "
                f"but {want} was requested: latencies do not transfer between backends, "
                "precisions or devices. Build a table on this target with `halp lut build`, or "
                "explicitly allow the mismatch"
            )

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash never leaves a half-written table."""
        atomic_write_json(path, self.to_dict())
        self.path = Path(path)

    @classmethod
    def load(cls, path: str | Path, *, backend: str | Backend | None = None,
             precision: str | None = None, device_key: str | None = None,
             allow_mismatch: bool = False) -> LatencyTable:
        """Read and validate a table; refuse one measured for another backend, precision or
        device than requested (``backend`` may be a Backend: all three are then checked)."""
        table = _parse(Path(path))
        if backend is not None and not isinstance(backend, str):
            described = backend.describe()
            backend = described["backend"]
            precision = precision or described["precision"]
            device_key = device_key or described["device_key"]
        if not allow_mismatch:
            table.check_backend({"backend": backend, "precision": precision,
                                 "device_key": device_key})
        return table


def _better(a: Measurement, b: Measurement) -> bool:
    return (a.n, -(a.p90_ms - a.p10_ms)) > (b.n, -(b.p90_ms - b.p10_ms))


def _provenance(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(meta.get("merged_from") or [
        {k: meta.get(k) for k in ("device", "device_key", "model", "created", "points")}])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Validation


class _Invalid(Exception):
    """A schema problem inside a table; turned into a LutError naming the file."""


def _parse(path: Path) -> LatencyTable:
    if not path.is_file():
        raise LutError(f"latency table {path} does not exist; build one with `halp lut build`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LutError(
            f"{path} is not valid JSON (truncated or corrupt: {exc}); {_REBUILD}") from None
    try:
        return _from_dict(data, path)
    except _Invalid as exc:
        raise LutError(f"{path}: {exc}; {_REBUILD}") from None


def _from_dict(data: Any, path: Path) -> LatencyTable:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise _Invalid(f"not a HALP latency table (format {found!r}, expected {FORMAT!r})")
    if data.get("version") == 1:
        raise _Invalid("table version 1 timed each layer alone, with its weights hot in cache, "
                       "which under-prices layers inside a network whose weights do not fit "
                       f"there; this halp reads version {VERSION} (in-network packed timing)")
    if data.get("version") != VERSION:
        raise _Invalid(f"table version {data.get('version')!r} is not supported "
                       f"(this halp reads version {VERSION})")
    _require(data, ("meta", "entries", "constant_ms", "dense_ms"), "table")
    meta, entries = data["meta"], data["entries"]
    if not isinstance(meta, dict) or not isinstance(entries, dict):
        raise _Invalid("'meta' and 'entries' must be JSON objects")
    _require(meta, ("backend", "precision", "device_key"), "meta")
    if not entries:
        raise _Invalid("the table has no entries")
    settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    statistic = settings.get("statistic", "median")  # tables before the setting used medians
    if statistic not in STATISTICS:
        raise _Invalid(f"meta.settings.statistic {statistic!r} is not one of {STATISTICS}")
    return LatencyTable(
        meta,
        {sig: _entry(sig, e, statistic) for sig, e in entries.items()},
        constant_ms=_number(data["constant_ms"], "constant_ms", optional=True, signed=True),
        dense_ms=_number(data["dense_ms"], "dense_ms", optional=True),
        scale=_number(data.get("scale", 1.0), "scale"),
        path=path,
    )


def _require(obj: Mapping[str, Any], keys: Iterable[str], what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise _Invalid(f"{what} is missing {', '.join(map(repr, missing))}")


def _entry(sig: str, data: Any, statistic: str) -> LutEntry:
    if not isinstance(data, dict):
        raise _Invalid(f"entry {sig!r} is not a JSON object")
    _require(data, ("layer_example", "points"), f"entry {sig!r}")
    if not isinstance(data["layer_example"], dict) or not isinstance(data["points"], list) \
            or not data["points"]:
        raise _Invalid(f"entry {sig!r} needs a 'layer_example' object and a non-empty "
                       "'points' list")
    points: dict[Point, Measurement] = {}
    for i, p in enumerate(data["points"]):
        where = f"entry {sig!r} point {i}"
        if not isinstance(p, list) or len(p) != 6:
            raise _Invalid(f"{where} is not [cin, cout, median_ms, p10_ms, p90_ms, n]")
        cin, cout, n = (_count(p[j], where) for j in (0, 1, 5))
        med, p10, p90 = (_number(p[j], where) for j in (2, 3, 4))
        points[(cin, cout)] = Measurement(med, p10, p90, n, statistic=statistic)
    return LutEntry(data["layer_example"], list(data.get("layers", [])), points)


def _number(value: Any, where: str, *, optional: bool = False, signed: bool = False) -> Any:
    """A finite number (>= 0 unless ``signed``); None allowed when ``optional``."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and (signed or value >= 0)
    if not ok:
        raise _Invalid(f"{where} has {value!r}, expected a finite"
                       f"{'' if signed else ' non-negative'} number")
    return float(value)


def _count(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _Invalid(f"{where} has {value!r}, expected a positive integer")
    return value


# ---------------------------------------------------------------------------------------------
# Building


def journal_path(out: str | Path) -> Path:
    return Path(f"{out}.journal")


def build_lut(
    spec: NetworkSpec,
    backend: Backend,
    *,
    step: int | None = None,
    max_points: int | None = None,
    out: str | Path,
    model: nn.Module | None = None,
    example_input: torch.Tensor | None = None,
    progress: bool = True,
    seed: int = 0,
    passes: int = 1,
) -> LatencyTable:
    """Measure every (signature, cin, cout) point ``spec`` needs and write the table to ``out``.

    Points are measured in a seeded shuffled order (so slow drift of the device does not
    correlate with channel count) and journaled to ``<out>.journal``; rerunning the same call
    measures only what is missing. With ``model``, the dense network and a half-width copy are
    measured too and the table is calibrated on them (:mod:`pipeline.calibration`): ``scale``
    and ``constant_ms`` such that scale · Σ entries + constant fits both.

    With ``passes`` > 1 every point is measured once per pass, each pass in its own shuffled
    order, so a point's measurements are minutes apart; the reference networks are measured in
    ``ROUNDS`` interleaved rounds after each pass. Repeats are combined by the protocol's
    rule (:func:`~pipeline.backends.timing.combine`: the fastest under p10, the median under
    median), so on a machine whose speed drifts (shared hosts, thermal throttling) an entry is
    not stuck with the one slow spell it happened to be measured in.
    """
    step = step or backend.default_step
    if step < 1 or passes < 1 or (max_points is not None and max_points < 2):
        raise HalpError(f"step and passes must be >= 1 and max_points >= 2 (got step={step}, "
                        f"passes={passes}, max_points={max_points})")
    described = backend.describe()
    protocol = {"name": PROTOCOL, "working_set_params": working_set(spec),
                "max_copies": MAX_COPIES, "compute_bound": COMPUTE_BOUND,
                "max_macs": MAX_PACKED_MACS}
    header = _normalised({
        "format": _JOURNAL_FORMAT, "version": VERSION, "backend": described,
        "build": {"step": step, "max_points": max_points, "seed": seed, "passes": passes,
                  "protocol": protocol},
    })
    out = Path(out)
    existing = _existing(out, spec, header)
    if existing is not None:
        return existing
    entries = plan(spec, step, max_points)
    journal = _Journal(journal_path(out), header)
    points = [(sig, ci, co) for sig, e in entries.items() for ci, co in sorted(e.points)]
    x = example_input if example_input is not None else torch.randn(*spec.input_shape)
    total = len(points) * passes
    done = sum(len(v) for v in journal.points.values())
    if done:
        log.info("resuming %s: %d of %d measurements already taken", journal.path, done, total)
    refs = references(model, x, spec, step) if model is not None else []
    timers = {name: backend.module_timer(module, x) for name, _, module in refs}
    with progress_bar(total=total, initial=done, disable=not progress, unit="pt",
                      desc="lut") as bar:
        for p in range(passes):
            todo = [pt for pt in points if p not in journal.points.get(pt, {})]
            random.Random(seed + p).shuffle(todo)
            _measure(backend, entries, todo, journal, p, bar, protocol["working_set_params"])
            for r in range(ROUNDS):  # calibration references, interleaved
                for name, timer in timers.items():
                    if (p, r) not in journal.refs.get(name, {}):
                        started = time.perf_counter()
                        journal.add({"ref": name, "pass": p, "round": r, **timer().to_dict()},
                                    time.perf_counter() - started)
    for sig, entry in entries.items():
        entry.points = {k: combine(list(journal.points[(sig, *k)].values()))
                        for k in entry.points}
    measured = {name: combine(list(journal.refs[name].values())) for name, _, _ in refs}
    meta = {
        **described,
        "batch": int(spec.input_shape[0]),
        "created": _now(),
        "model": spec.model,
        "input_shape": list(spec.input_shape),
        "step": step,
        "max_points": max_points,
        "seed": seed,
        "points": len(points),
        "passes": passes,
        "protocol": protocol,
        "build_s": round(journal.spent_s, 3),
        "dense": measured["dense"].to_dict() if measured else None,
    }
    table = LatencyTable(meta, entries)
    if measured:
        lut_ms = {name: sum(table.layer_latencies(spec, counts, calibrated=False).values())
                  for name, counts, _ in refs}
        cal = fit(*((lut_ms[name], measured[name].ms) for name, _, _ in refs))  # dense first
        table.dense_ms, table.scale, table.constant_ms = (measured["dense"].ms, cal.scale,
                                                          cal.constant_ms)
        meta["calibration"] = {name: {"lut_ms": lut_ms[name], "measured_ms": measured[name].ms,
                                      "counts": {str(g): c for g, c in counts.items()}}
                               for name, counts, _ in refs}
        meta["check"] = cal.to_dict()
    table.save(out)
    journal.path.unlink(missing_ok=True)
    return table


def _normalised(obj: Any) -> Any:
    """As it reads back from JSON (tuples become lists), so headers compare equal."""
    return json.loads(json.dumps(obj))


def _existing(out: Path, spec: NetworkSpec, header: dict[str, Any]) -> LatencyTable | None:
    """A finished table at ``out`` from the same build (rerun after success: nothing to do);
    refuse to overwrite one built otherwise."""
    if not out.exists():
        return None
    table = _parse(out)
    same = all(table.meta.get(k) == v for k, v in {**header["backend"], **header["build"]}.items())
    try:
        table.check_spec(spec)
    except LutMismatch:
        same = False
    if not same or table.meta.get("input_shape") != list(spec.input_shape):
        raise LutMismatch(
            f"{out} already exists and was built for {table._built_for()} with other settings "
            "or on another target; delete it or choose another --out"
        )
    log.info("%s is already complete for this build; nothing to measure", out)
    return table


class _Journal:
    """The append-only record of one build: finished points, the reference networks and the
    measuring time spent, accumulated over interrupted runs."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.points: dict[tuple[str, int, int], dict[int, Measurement]] = {}  # point -> pass
        #: calibration network -> (pass, round)
        self.refs: dict[str, dict[tuple[int, int], Measurement]] = {}
        self.spent_s = 0.0
        if not path.exists():  # the header is written whole, never torn
            atomic_write_text(path, json.dumps({"header": header}) + "\n")
            return
        _drop_torn_tail(path)
        records = read_journal(path)
        first = next(records, None)
        found = first.get("header") if isinstance(first, dict) else None
        if found != header:
            raise LutMismatch(
                f"{path} is the journal of another build ({_header_diff(found, header)}); "
                "delete it to start over, or choose another --out"
            )
        for rec in records:
            self._take(rec)

    def _take(self, rec: dict[str, Any]) -> None:
        self.spent_s += rec.get("wall_s", 0.0)
        p = int(rec.get("pass", 0))
        if "ref" in rec:
            key = (p, int(rec.get("round", 0)))
            self.refs.setdefault(rec["ref"], {})[key] = Measurement.from_dict(rec)
        else:
            point = (rec["sig"], rec["cin"], rec["cout"])
            self.points.setdefault(point, {})[p] = Measurement.from_dict(rec)

    def add(self, rec: dict[str, Any], wall_s: float) -> None:
        """Append a finished point (``sig``, ``cin``, ``cout`` + measurement) or a reference
        network's measurement (``ref``)."""
        rec = {**rec, "wall_s": round(wall_s, 4)}
        append_journal(self.path, rec)
        self._take(rec)


def _drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line (crash mid-append) so new records start on a fresh line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        atomic_write_bytes(path, data[: data.rfind(b"\n") + 1])


def _header_diff(found: Any, header: dict[str, Any]) -> str:
    if not isinstance(found, dict):
        return "it has no valid header"
    diffs = []
    for part in ("backend", "build"):
        a, b = found.get(part) or {}, header[part]
        diffs += [f"{k}: journal {a.get(k)!r}, now {b.get(k)!r}"
                  for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs) or "format differs"


def working_set(spec: NetworkSpec) -> int:
    """Parameters of the network's conv/linear layers: the weights that stream through the
    caches between two runs of any one layer (the packed protocol's target, :data:`PROTOCOL`)."""
    return int(sum(layer.params for layer in spec.layers))


def _measure(backend: Backend, entries: Mapping[str, LutEntry],
             todo: list[tuple[str, int, int]], journal: _Journal, p: int, bar: tqdm,
             params: int) -> None:
    examples = {sig: _layer_from_geometry(e.layer_example) for sig, e in entries.items()}
    for sig, cin, cout in todo:
        started = time.perf_counter()
        copies = copies_for(examples[sig], cin, cout, params)
        m = backend.time_layer(examples[sig], cin, cout, copies=copies)
        journal.add({"sig": sig, "cin": cin, "cout": cout, "pass": p, "copies": copies,
                     **m.to_dict()}, time.perf_counter() - started)
        bar.update()
