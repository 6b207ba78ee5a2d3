"""Measuring a planned table on a backend, resumably: the torch-free core of every table build.

Points are timed under the packed protocol (:data:`~pipeline.lut.grid.PROTOCOL`) in seeded
shuffled passes and journaled as they finish (:mod:`pipeline.lut.journal`); after each pass the
calibration's reference networks are timed in interleaved rounds, and the finished table is
calibrated on them (:mod:`pipeline.calibration`). ``halp lut build`` calls this with references
it slims and exports from the model (:func:`~pipeline.lut.build.build_lut`); a device without
torch calls it with references exported beforehand (:mod:`pipeline.device`), so both measure
the same points the same way.
"""

from __future__ import annotations

import logging
import math
import random
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends import Backend, BackendInfo, Measurement
from ..backends.timing import ROUNDS, combine
from ..calibration import fit
from ..errors import HalpError, LutMismatch
from ..onnx_layers import (
    BRACKET_OVERSHOOT,
    COLD_INTENSITY,
    COLD_MACS,
    COMPUTE_BOUND,
    MAX_COPIES,
    MAX_PACKED_MACS,
)
from ..progress import progress as progress_bar
from ..spec import NetworkSpec
from .cold import apply_cold, measure_cold
from .grid import PROTOCOL, LutEntry, Point, working_set
from .journal import Journal, journal_header, journal_path
from .ladders import HEAVY_SHARE, RUNGS, ladder_meta, measure_ladders
from .schema import utc_now
from .table import LatencyTable
from .working_sets import WorkingSets

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

#: (sig, cin, cout): one point to measure
Task = typing.Tuple[str, int, int]
#: (name, group counts, timer): a calibration reference network, prepared to be timed
Reference = typing.Tuple[str, typing.Dict[int, int], typing.Callable[[], Measurement]]


@dataclass(frozen=True)
class Settings:
    """What a build was asked for. With the backend's description it is the journal header
    (a rerun asking for anything else is another build), and it goes into the table's meta.
    ``shard`` ([i, n], 1-based) when this build measures only every n-th point (one device of
    several, merged afterwards with ``halp lut merge``)."""

    step: int
    max_points: int | None
    seed: int
    passes: int
    protocol: dict[str, Any]
    shard: list[int] | None = None

    def __post_init__(self) -> None:
        if self.step < 1 or self.passes < 1 or (self.max_points is not None
                                                and self.max_points < 2):
            raise HalpError(f"step and passes must be >= 1 and max_points >= 2 (got step="
                            f"{self.step}, passes={self.passes}, max_points={self.max_points})")
        if self.shard is not None and not 1 <= self.shard[0] <= self.shard[1]:
            raise HalpError(f"shard {self.shard[0]}/{self.shard[1]} is not i/n with 1 <= i <= n")


def protocol(spec: NetworkSpec) -> dict[str, Any]:
    """How the points are measured, recorded in the header and the table: a table built
    otherwise is another build."""
    return {"name": PROTOCOL, "working_set_params": working_set(spec),
            "max_copies": MAX_COPIES, "compute_bound": COMPUTE_BOUND,
            "max_macs": MAX_PACKED_MACS, "cold_intensity": COLD_INTENSITY,
            "cold_macs": COLD_MACS, "bracket_overshoot": BRACKET_OVERSHOOT,
            "heavy_share": HEAVY_SHARE, "rungs": RUNGS}


def tasks_of(entries: Mapping[str, LutEntry], shard: Sequence[int] | None = None) -> list[Task]:
    """Every point of ``entries`` in a fixed order, or the ``shard`` [i, n]'s share of them
    (every n-th from the i-th), so n devices split one table between them."""
    tasks = [(sig, ci, co) for sig in sorted(entries) for ci, co in sorted(entries[sig].points)]
    return tasks if shard is None else tasks[shard[0] - 1::shard[1]]


def measure_table(spec: NetworkSpec, entries: Mapping[str, LutEntry], backend: Backend,
                  settings: Settings, out: Path,
                  references: Callable[[], Sequence[Reference]] = lambda: (), *,
                  model: str = "", progress: bool = True) -> LatencyTable:
    """Measure the points of ``entries`` (the shard's, if any) and the reference networks
    ``references()`` prepares (called only when there is something to measure), write the
    table to ``out`` and return it; an interrupted call resumes from ``<out>.journal``.

    Points are measured in a seeded shuffled order (so slow drift of the device does not
    correlate with channel count), once per pass, each pass in its own order, so a point's
    measurements are minutes apart; the references are timed in interleaved rounds after each
    pass, ``ROUNDS`` in all (as `halp verify` measures a network). Repeats are combined by the
    protocol's rule (:func:`~pipeline.backends.timing.combine`: the fastest under p10, the
    median under median), so on a machine whose speed drifts an entry is not stuck with the
    one slow spell it happened to be measured in.
    """
    described = backend.describe()
    header = journal_header(described, asdict(settings))
    existing = _existing(out, spec, header, complete=settings.shard is None)
    if existing is not None:
        return existing
    tasks = tasks_of(entries, settings.shard)
    entries = _holding(entries, tasks)
    journal = Journal(journal_path(out), header)
    if journal.taken:
        log.info("resuming %s: %d of %d measurements already taken", journal.path,
                 journal.taken, len(tasks) * settings.passes)
    # one shard measures the references; a merge calibrates every part on them
    refs = list(references()) if settings.shard is None or settings.shard[0] == 1 else []
    timers = {name: timer for name, _, timer in refs}
    sets = WorkingSets(spec, entries)
    _measure_passes(backend, entries, tasks, timers, journal, settings, sets, progress=progress)
    table = _assemble(spec, entries, journal, refs, described, settings, model, sets)
    table.save(out)
    journal.path.unlink(missing_ok=True)
    return table


def _holding(entries: Mapping[str, LutEntry], tasks: list[Task]) -> dict[str, LutEntry]:
    """Copies of the ``entries`` that ``tasks`` (a shard's share) measure, each with only
    those points: the caller's plan is left as it was."""
    points: dict[str, dict[Point, None]] = {}
    for sig, cin, cout in tasks:
        points.setdefault(sig, {})[(cin, cout)] = None
    return {sig: LutEntry(dict(e.layer_example), list(e.layers), points[sig])
            for sig, e in entries.items() if sig in points}


def _existing(out: Path, spec: NetworkSpec, header: dict[str, Any], *,
              complete: bool) -> LatencyTable | None:
    """A finished table at ``out`` from the same build (rerun after success: nothing to do);
    refuse to overwrite one built otherwise. A shard (not ``complete``) holds only part of
    the spec's entries."""
    if not out.exists():
        return None
    table = LatencyTable.load(out)
    same = all(table.meta.get(k) == v for k, v in {**header["backend"], **header["build"]}.items())
    if complete:
        try:
            table.check_spec(spec)
        except LutMismatch:
            same = False
    if not same or table.meta.get("input_shape") != list(spec.input_shape):
        raise LutMismatch(
            f"{out} already exists and was built for {table.built_for()} with other settings "
            "or on another target; delete it or choose another --out"
        )
    log.info("%s is already complete for this build; nothing to measure", out)
    return table


def _measure_passes(backend: Backend, entries: Mapping[str, LutEntry], tasks: list[Task],
                    timers: Mapping[str, Callable[[], Measurement]], journal: Journal,
                    settings: Settings, sets: WorkingSets, *, progress: bool) -> None:
    """Each pass: the entries' cold-factor anchors and ladder rungs it still lacks
    (:mod:`pipeline.lut.cold`, :mod:`pipeline.lut.ladders`), the points it still lacks in the
    pass's own shuffled order, then the reference networks' rounds it still lacks."""
    with progress_bar(total=len(tasks) * settings.passes, initial=journal.taken,
                      disable=not progress, unit="pt", desc="lut") as bar:
        for p in range(settings.passes):
            measure_cold(backend, entries, journal, sets, p)
            measure_ladders(backend, entries, journal, sets, p)
            todo = [pt for pt in tasks if p not in journal.points.get(pt, {})
                    or (sets.bracket(*pt) and p not in journal.below.get(pt, {}))]
            random.Random(settings.seed + p).shuffle(todo)
            _measure(backend, todo, journal, p, bar, sets)
            _measure_references(timers, journal, p, math.ceil(ROUNDS / settings.passes))


def _measure(backend: Backend, todo: list[Task], journal: Journal, p: int, bar: tqdm,
             sets: WorkingSets) -> None:
    """Time the points ``todo`` in pass ``p``, each packed for its working set: with the whole
    copies above it, and right after with those below where it lies between the two
    (:meth:`~pipeline.lut.working_sets.WorkingSets.bracket`)."""
    for sig, cin, cout in todo:
        point = (sig, cin, cout)
        runs = [(sets.copies(*point), journal.points, {})]
        bracket = sets.bracket(*point)
        if bracket:
            runs.append((bracket[0], journal.below, {"below": True}))
        for copies, taken, mark in runs:
            if p in taken.get(point, {}):
                continue  # journaled before an interruption
            journal.measure({"sig": sig, "cin": cin, "cout": cout, "pass": p, "copies": copies,
                             **mark},
                            partial(backend.time_layer, sets.example(sig), cin, cout,
                                    copies=copies))
            bar.update(int(not mark))


def _measure_references(timers: Mapping[str, Callable[[], Measurement]], journal: Journal,
                        p: int, rounds: int) -> None:
    """The reference networks' ``rounds`` rounds of pass ``p``, interleaved so that a slow
    spell of the device falls on all of them alike."""
    for r in range(rounds):
        for name, timer in timers.items():
            if (p, r) not in journal.refs.get(name, {}):
                journal.measure({"ref": name, "pass": p, "round": r}, timer)


def _assemble(spec: NetworkSpec, entries: dict[str, LutEntry], journal: Journal,
              references: Sequence[Reference], described: BackendInfo, settings: Settings,
              model: str, sets: WorkingSets) -> LatencyTable:
    """The table from the journal: each point's and reference's passes combined by the
    protocol's rule. The references' measurements are kept in the meta; a whole table (not a
    shard) is calibrated on them at once, a shard when merged (:func:`calibrate`)."""
    for sig, entry in entries.items():
        entry.points = {k: _combined(journal, sets, (sig, *k)) for k in entry.points}
    cold = apply_cold(entries, journal, sets)
    measured = {name: combine(list(journal.refs[name].values())) for name, _, _ in references}
    meta = {
        **described.to_dict(),
        "batch": int(spec.input_shape[0]),
        "created": utc_now(),
        "model": model,
        "input_shape": list(spec.input_shape),
        "step": settings.step,
        "max_points": settings.max_points,
        "seed": settings.seed,
        "points": sum(len(e.points) for e in entries.values()),
        "passes": settings.passes,
        "protocol": settings.protocol,
        "cold": cold,
        "streams": ladder_meta(entries, journal, sets),
        "shard": settings.shard,
        "build_s": round(journal.spent_s, 3),
        "dense": measured["dense"].to_dict() if measured else None,
        "references": {name: {"counts": {str(g): c for g, c in counts.items()},
                              **measured[name].to_dict()}
                       for name, counts, _ in references} or None,
    }
    table = LatencyTable(meta, entries)
    if measured and settings.shard is None:
        calibrate(table, spec)
    return table


def _combined(journal: Journal, sets: WorkingSets, point: Task) -> Measurement:
    """The point's passes combined, and priced between the copies below and above its
    working set where it lies between the two (in proportion, per copy)."""
    above = combine(list(journal.points[point].values()))
    bracket = sets.bracket(*point)
    if bracket is None:
        return above
    below = combine(list(journal.below[point].values()))
    return below.toward(above, bracket[1])


def calibrate(table: LatencyTable, spec: NetworkSpec) -> None:
    """Set the table's ``scale`` and ``constant_ms`` from the fit of its raw sums to the
    reference networks measured with it (``meta["references"]``, dense first), and record the
    sums and the check in its meta. The table must price every layer of ``spec``."""
    refs = {name: ({int(g): c for g, c in ref["counts"].items()}, Measurement.from_dict(ref))
            for name, ref in table.meta["references"].items()}
    lut_ms = {name: sum(table.layer_latencies(spec, counts, calibrated=False).values())
              for name, (counts, _) in refs.items()}
    cal = fit(*((lut_ms[name], m.ms) for name, (_, m) in refs.items()))
    table.dense_ms, table.scale, table.constant_ms = refs["dense"][1].ms, cal.scale, \
        cal.constant_ms
    table.meta["calibration"] = {
        name: {"lut_ms": lut_ms[name], "measured_ms": m.ms,
               "counts": {str(g): c for g, c in counts.items()}}
        for name, (counts, m) in refs.items()}
    table.meta["check"] = cal.to_dict()
