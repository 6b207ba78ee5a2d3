"""The table file: its format and version, and the validation of a file read back.

A table may be hours of measuring copied between machines, hand-merged or cut short by a full
disk, so reading one checks every field and names the file and the field in the error, rather
than failing later inside a query. Version 2 entries are packed in-network measurements
(:data:`~pipeline.lut.grid.PROTOCOL`); version 1 tables timed layers alone and are refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from ..backends import Measurement
from ..errors import LutError
from ..kinds import OpKind, Statistic
from .grid import LutEntry, Point

FORMAT = "halp-lut"
#: 2: entries are packed in-network measurements (:data:`~pipeline.lut.grid.PROTOCOL`);
#: 1 timed layers alone
VERSION = 2
_REBUILD = "rebuild it with `halp lut build --model NAME --input SHAPE --backend ... --out FILE`"


class Contents(NamedTuple):
    """A validated table file: what a :class:`~pipeline.lut.table.LatencyTable` is made of."""

    meta: dict[str, Any]
    entries: dict[str, LutEntry]
    constant_ms: float | None
    dense_ms: float | None
    scale: float


class _Invalid(Exception):
    """A schema problem inside a table; turned into a LutError naming the file."""


def utc_now() -> str:
    """The timestamp a table records (``meta.created``, its merge provenance)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_table(path: Path) -> Contents:
    """The validated contents of the table at ``path``; LutError saying what is wrong and how
    to get a sound table."""
    if not path.is_file():
        raise LutError(f"latency table {path} does not exist; build one with `halp lut build`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LutError(
            f"{path} is not valid JSON (truncated or corrupt: {exc}); {_REBUILD}") from None
    try:
        return _from_dict(data)
    except _Invalid as exc:
        raise LutError(f"{path}: {exc}; {_REBUILD}") from None


def _from_dict(data: Any) -> Contents:
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
    statistic = settings.get("statistic", Statistic.MEDIAN)  # tables before it used medians
    if statistic not in tuple(Statistic):
        raise _Invalid(f"meta.settings.statistic {statistic!r} is not one of "
                       f"{tuple(map(str, Statistic))}")
    return Contents(
        meta,
        {sig: _entry(sig, e, statistic) for sig, e in entries.items()},
        constant_ms=_number(data["constant_ms"], "constant_ms", optional=True, signed=True),
        dense_ms=_number(data["dense_ms"], "dense_ms", optional=True),
        scale=_number(data.get("scale", 1.0), "scale"),
    )


def _require(obj: Mapping[str, Any], keys: Iterable[str], what: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise _Invalid(f"{what} is missing {', '.join(map(repr, missing))}")


def _entry(sig: str, data: Any, statistic: Statistic) -> LutEntry:
    if not isinstance(data, dict):
        raise _Invalid(f"entry {sig!r} is not a JSON object")
    _require(data, ("layer_example", "points"), f"entry {sig!r}")
    if not isinstance(data["layer_example"], dict) or not isinstance(data["points"], list) \
            or not data["points"]:
        raise _Invalid(f"entry {sig!r} needs a 'layer_example' object and a non-empty "
                       "'points' list")
    op = data["layer_example"].get("op")
    if op not in tuple(OpKind):  # the op decides how points are interpolated (depthwise)
        raise _Invalid(f"entry {sig!r} has op {op!r}, not one of {', '.join(OpKind)}")
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
