"""The latency table: measured per-layer latencies on one target, queried by the pruner.

HALP prunes by *measured* latency, so the table is the ground truth the pruner optimises
against. A table is only valid for the backend, precision and device it was measured on, and
:meth:`LatencyTable.load` refuses it anywhere else unless told otherwise. Shards measured on
devices of the same kind merge into one table.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends.capabilities import BackendInfo
from ..errors import LutMismatch
from ..fsio import atomic_write_json
from ..spec import LayerSpec, NetworkSpec
from .grid import LutEntry
from .interpolate import Grid, OutOfRange
from .schema import FORMAT, VERSION, read_table, utc_now
from .stream_pricing import StreamCurves, network_params

if TYPE_CHECKING:
    from ..backends import Backend, Measurement

#: meta keys that must agree for two tables to be merged (device_key names a device model)
_MERGE_KEYS = ("backend", "precision", "device_key", "settings", "threads", "versions", "step",
               "protocol")


class LatencyTable:
    """Measured per-layer latencies for one backend/precision/device, with the calibration
    against whole networks (:mod:`pipeline.calibration`): queries return ``scale`` × the
    measured entry, and predictions add ``constant_ms`` for what the entries do not cover.
    A heavy memory-bound entry is priced in the working set of the network it is in, where
    the query names it (:mod:`pipeline.lut.stream_pricing`)."""

    def __init__(self, meta: dict[str, Any], entries: Mapping[str, LutEntry], *,
                 constant_ms: float | None = None, dense_ms: float | None = None,
                 scale: float = 1.0, path: str | Path | None = None):
        self.meta = meta
        self.entries = dict(entries)
        self.constant_ms = constant_ms
        self.dense_ms = dense_ms
        self.scale = scale
        self.path = Path(path) if path is not None else None
        self._grids: dict[str, Grid] = {}
        self._query = lru_cache(maxsize=1 << 16)(self._value)
        #: the heavy entries' ladders; false for a table without any
        self.streams = StreamCurves(meta.get("streams"))

    # -- queries -----------------------------------------------------------------------------

    def _grid(self, signature: str) -> Grid:
        grid = self._grids.get(signature)
        if grid is None:
            grid = self._grids[signature] = Grid(self.entries[signature])
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
                f"for {self.built_for()}; build one for this model with `halp lut build`"
            )
        try:
            return self._query(sig, int(cin), int(cout))
        except OutOfRange:
            lo_in, hi_in, lo_out, hi_out = self._grid(sig).span()
            raise LutMismatch(
                f"{self._where()}: layer {layer.name} queried at cin={cin}, cout={cout}, beyond "
                f"the measured range (cin {lo_in}..{hi_in}, cout {lo_out}..{hi_out}) of {sig}; "
                f"the table was built for {self.built_for()}: build one for this model with "
                "`halp lut build`"
            ) from None

    def built_for(self) -> str:
        """The model and input the table was measured for, for error messages."""
        shape = self.meta.get("input_shape")
        return f"{self.meta.get('model') or 'another model'}" + (
            f" @ {'x'.join(map(str, shape))}" if shape else "")

    def lookup(self, layer: LayerSpec, cin: int, cout: int) -> tuple[float, bool]:
        """(ms, exact): exact is False when the value was interpolated or extrapolated."""
        ms, kind = self._classify(layer, cin, cout)
        return self.scale * ms, kind == "exact"

    def latency(self, layer: LayerSpec, cin: int, cout: int,
                network_params: int | None = None) -> float:
        """Milliseconds for ``layer`` at (cin, cout), calibrated (``scale`` × the entry); in a
        network of ``network_params`` weights where given (:meth:`working_set`), else in the
        working set its point was timed in."""
        return self.scale * self._priced(layer, cin, cout, network_params)

    def _priced(self, layer: LayerSpec, cin: int, cout: int, params: int | None) -> float:
        ms = self._classify(layer, cin, cout)[0]
        return ms if params is None else ms * self.streams.factor(layer, cin, cout, params)

    def working_set(self, spec: NetworkSpec, counts: Mapping[int, int] | None = None
                    ) -> int | None:
        """The weights of ``spec`` at ``counts``, which price its layers in
        :meth:`layer_latencies`; None for a table that prices every layer at its point
        alone (no entry has ladders)."""
        return network_params(spec, counts) if self.streams else None

    def is_measured(self, layer: LayerSpec, cin: int, cout: int) -> bool:
        return self.lookup(layer, cin, cout)[1]

    def layer_latencies(self, spec: NetworkSpec, counts: Mapping[int, int] | None = None, *,
                        calibrated: bool = True) -> dict[str, float]:
        """Per layer name: its latency when each group keeps ``counts[group]`` channels, in
        the working set of that network (``calibrated=False``: the measured entries, without
        the calibration scale)."""
        scale = self.scale if calibrated else 1.0
        params = self.working_set(spec, counts)
        return {layer.name: scale * self._priced(layer, *layer.dims(counts), params)
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
        # a shard's reference networks (measured by one shard only) calibrate the union
        meta["references"] = self.meta.get("references") or other.meta.get("references")
        # each shard measured the cold factors of the entries it holds (pipeline.lut.cold)
        meta["cold"] = {**(other.meta.get("cold") or {}), **(self.meta.get("cold") or {})}
        # and the ladders of its heavy entries (pipeline.lut.ladders)
        streams = [t.meta["streams"] for t in (other, self) if t.meta.get("streams")]
        meta["streams"] = {"network": streams[0]["network"], "entries": {
            sig: c for s in streams for sig, c in s["entries"].items()}} if streams else None
        meta["shard"] = None
        meta["merged_from"] = [*_provenance(self.meta), *_provenance(other.meta)]
        meta["created"] = utc_now()
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

    def check_backend(self, wanted: BackendInfo | Mapping[str, Any]) -> None:
        """Refuse a table measured with another backend, precision or device than ``wanted``:
        a backend's description, or some of its keys (absent or None ones are not checked)."""
        if isinstance(wanted, BackendInfo):
            wanted = wanted.to_dict()
        wrong = {k: str(wanted[k]) for k in ("backend", "precision", "device_key")
                 if wanted.get(k) is not None and self.meta[k] != wanted[k]}
        if wrong:
            have = ", ".join(f"{k}={self.meta[k]!r}" for k in wrong)
            want = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
            raise LutMismatch(
                f"{self._where()} was measured with {have} (device: {self.meta.get('device')}), "
                f"but {want} was requested: latencies do not transfer between backends, "
                "precisions or devices. Build a table on this target with `halp lut build`, or "
                "accept another target's latencies with --allow-lut-mismatch (halp prune, "
                "halp verify; allow_mismatch=True in the library)"
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
        path = Path(path)
        contents = read_table(path)
        table = cls(contents.meta, contents.entries, constant_ms=contents.constant_ms,
                    dense_ms=contents.dense_ms, scale=contents.scale, path=path)
        if backend is not None and not isinstance(backend, str):
            info = backend.describe()
            backend = info.backend
            precision = precision or info.precision
            device_key = device_key or info.device_key
        if not allow_mismatch:
            table.check_backend({"backend": backend, "precision": precision,
                                 "device_key": device_key})
        return table


def _better(a: Measurement, b: Measurement) -> bool:
    return (a.n, -(a.p90_ms - a.p10_ms)) > (b.n, -(b.p90_ms - b.p10_ms))


def _provenance(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(meta.get("merged_from") or [
        {k: meta.get(k) for k in ("device", "device_key", "model", "created", "points", "shard")}])

