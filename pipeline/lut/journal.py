"""The journal of a table build: every finished measurement, so an interrupted build resumes.

A build can take hours on a Jetson. Each point and each reference-network round is appended to
``<out>.journal`` as it finishes; a rerun of the same build reads it back and measures only
what is missing. The first record is a header naming the backend and the build settings, and a
rerun with other ones is refused rather than mixing two builds in one table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..backends import BackendInfo, Measurement
from ..errors import LutMismatch
from ..fsio import append_journal, atomic_write_bytes, atomic_write_text, read_journal
from .schema import VERSION

_FORMAT = "halp-lut-journal"


def journal_path(out: str | Path) -> Path:
    """Where the build of the table ``out`` keeps its journal."""
    return Path(f"{out}.journal")


def journal_header(backend: BackendInfo, build: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a build (the backend's description and the build settings), as it reads
    back from JSON (tuples become lists) so that headers compare equal."""
    header = {"format": _FORMAT, "version": VERSION, "backend": backend.to_dict(),
              "build": build}
    return json.loads(json.dumps(header))


class Journal:
    """The append-only record of one build: finished points, the reference networks and the
    measuring time spent, accumulated over interrupted runs."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.points: dict[tuple[str, int, int], dict[int, Measurement]] = {}  # point -> pass
        #: calibration network -> (pass, round)
        self.refs: dict[str, dict[tuple[int, int], Measurement]] = {}
        #: (entry signature, cin, cout, "hot" / "streamed") -> pass (:mod:`pipeline.lut.cold`)
        self.cold: dict[tuple[str, int, int, str], dict[int, Measurement]] = {}
        #: point -> pass: its time at the whole copies below its working set
        #: (:meth:`~pipeline.lut.working_sets.WorkingSets.bracket`)
        self.below: dict[tuple[str, int, int], dict[int, Measurement]] = {}
        #: (entry signature, cin, cout, copies) -> pass: a rung of its ladder
        #: (:mod:`pipeline.lut.ladders`)
        self.ladders: dict[tuple[str, int, int, int], dict[int, Measurement]] = {}
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

    @property
    def taken(self) -> int:
        """Point measurements already taken, over all passes."""
        return sum(len(v) for v in self.points.values())

    def _take(self, rec: dict[str, Any]) -> None:
        self.spent_s += rec.get("wall_s", 0.0)
        p = int(rec.get("pass", 0))
        if "cold" in rec:
            key = (rec["cold"], rec["cin"], rec["cout"], rec["role"])
            self.cold.setdefault(key, {})[p] = Measurement.from_dict(rec)
        elif "ladder" in rec:
            key = (rec["ladder"], rec["cin"], rec["cout"], rec["copies"])
            self.ladders.setdefault(key, {})[p] = Measurement.from_dict(rec)
        elif "ref" in rec:
            key = (p, int(rec.get("round", 0)))
            self.refs.setdefault(rec["ref"], {})[key] = Measurement.from_dict(rec)
        else:
            point = (rec["sig"], rec["cin"], rec["cout"])
            taken = self.below if rec.get("below") else self.points
            taken.setdefault(point, {})[p] = Measurement.from_dict(rec)

    def measure(self, rec: dict[str, Any], timer: Callable[[], Measurement]) -> Measurement:
        """Run ``timer`` and :meth:`add` its measurement under ``rec``, with the wall time it
        took."""
        started = time.perf_counter()
        m = timer()
        self.add({**rec, **m.to_dict()}, time.perf_counter() - started)
        return m

    def add(self, rec: dict[str, Any], wall_s: float) -> None:
        """Append a finished point (``sig``, ``cin``, ``cout`` + measurement; ``below`` when
        timed at the copies below its working set), a reference
        network's measurement (``ref``), one of an entry's cold-factor pairs (``cold``,
        ``role``, ``cin``, ``cout``) or a rung of its ladder (``ladder``, ``cin``, ``cout``,
        ``copies``)."""
        rec = {**rec, "wall_s": round(wall_s, 4)}
        append_journal(self.path, rec)
        self._take(rec)


def _drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line (crash mid-append) so new records start on a fresh line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        atomic_write_bytes(path, data[: data.rfind(b"\n") + 1])


def _header_diff(found: Any, header: dict[str, Any]) -> str:
    """The settings that differ between a journal's header and this build's, for the error."""
    if not isinstance(found, dict):
        return "it has no valid header"
    diffs = []
    for part in ("backend", "build"):
        a, b = found.get(part) or {}, header[part]
        diffs += [f"{k}: journal {a.get(k)!r}, now {b.get(k)!r}"
                  for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs) or "format differs"
