"""Building a latency table: measure every point a network needs on a backend, resumably.

Points are timed under the packed protocol (:data:`~pipeline.lut.grid.PROTOCOL`) in seeded
shuffled passes and journaled as they finish (:mod:`pipeline.lut.journal`). With the model at
hand, the dense network and reduced-width copies are measured too and the table is calibrated
on them (:mod:`pipeline.calibration`). This is the only part of :mod:`pipeline.lut` that needs
torch, the layer graphs and Torch-Pruning (to slim the reference networks), so
``pipeline.lut`` imports it on first use of :func:`build_lut`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..backends import Backend, BackendInfo, Measurement
from ..backends.timing import ROUNDS, combine
from ..calibration import fit, references
from ..errors import HalpError, LutMismatch
from ..onnx_layers import COMPUTE_BOUND, MAX_COPIES, MAX_PACKED_MACS, copies_for
from ..progress import progress as progress_bar
from ..spec import NetworkSpec
from .grid import PROTOCOL, LutEntry, layer_from_geometry, plan, working_set
from .journal import Journal, journal_header, journal_path
from .schema import utc_now
from .table import LatencyTable

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

#: (sig, cin, cout): one point to measure
_Task = tuple[str, int, int]
#: (name, group counts, network): a calibration reference (:func:`~pipeline.calibration.references`)
_Reference = tuple[str, dict[int, int], nn.Module]


@dataclass(frozen=True)
class _Settings:
    """What a build was asked for. With the backend's description it is the journal header
    (a rerun asking for anything else is another build), and it goes into the table's meta."""

    step: int
    max_points: int | None
    seed: int
    passes: int
    protocol: dict[str, Any]


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
    interleaved rounds after each pass, ``ROUNDS`` in all (as `halp verify` measures a
    network). Repeats are combined by the protocol's rule
    (:func:`~pipeline.backends.timing.combine`: the fastest under p10, the median under median),
    so on a machine whose speed drifts (shared hosts, thermal throttling) an entry is not stuck
    with the one slow spell it happened to be measured in.
    """
    step = step or backend.default_step
    if step < 1 or passes < 1 or (max_points is not None and max_points < 2):
        raise HalpError(f"step and passes must be >= 1 and max_points >= 2 (got step={step}, "
                        f"passes={passes}, max_points={max_points})")
    described = backend.describe()
    settings = _Settings(step, max_points, seed, passes, _protocol(spec))
    header = journal_header(described, asdict(settings))
    out = Path(out)
    existing = _existing(out, spec, header)
    if existing is not None:
        return existing
    entries = plan(spec, step, max_points)
    journal = Journal(journal_path(out), header)
    tasks = [(sig, ci, co) for sig, e in entries.items() for ci, co in sorted(e.points)]
    x = example_input if example_input is not None else torch.randn(*spec.input_shape)
    if journal.taken:
        log.info("resuming %s: %d of %d measurements already taken", journal.path,
                 journal.taken, len(tasks) * passes)
    refs = references(model, x, spec, step) if model is not None else []
    timers = {name: backend.module_timer(module, x) for name, _, module in refs}
    _measure_passes(backend, entries, tasks, timers, journal, settings, progress=progress)
    table = _assemble(spec, entries, journal, refs, described, settings)
    table.save(out)
    journal.path.unlink(missing_ok=True)
    return table


def _protocol(spec: NetworkSpec) -> dict[str, Any]:
    """How the points are measured, recorded in the header and the table: a table built
    otherwise is another build."""
    return {"name": PROTOCOL, "working_set_params": working_set(spec),
            "max_copies": MAX_COPIES, "compute_bound": COMPUTE_BOUND,
            "max_macs": MAX_PACKED_MACS}


def _existing(out: Path, spec: NetworkSpec, header: dict[str, Any]) -> LatencyTable | None:
    """A finished table at ``out`` from the same build (rerun after success: nothing to do);
    refuse to overwrite one built otherwise."""
    if not out.exists():
        return None
    table = LatencyTable.load(out)
    same = all(table.meta.get(k) == v for k, v in {**header["backend"], **header["build"]}.items())
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


def _measure_passes(backend: Backend, entries: Mapping[str, LutEntry], tasks: list[_Task],
                    timers: Mapping[str, Callable[[], Measurement]], journal: Journal,
                    settings: _Settings, *, progress: bool) -> None:
    """Each pass: the points it still lacks in the pass's own shuffled order, then the
    reference networks' rounds it still lacks."""
    with progress_bar(total=len(tasks) * settings.passes, initial=journal.taken,
                      disable=not progress, unit="pt", desc="lut") as bar:
        for p in range(settings.passes):
            todo = [pt for pt in tasks if p not in journal.points.get(pt, {})]
            random.Random(settings.seed + p).shuffle(todo)
            _measure(backend, entries, todo, journal, p, bar,
                     settings.protocol["working_set_params"])
            _measure_references(timers, journal, p, math.ceil(ROUNDS / settings.passes))


def _measure(backend: Backend, entries: Mapping[str, LutEntry], todo: list[_Task],
             journal: Journal, p: int, bar: tqdm, params: int) -> None:
    """Time the points ``todo`` in pass ``p``, each packed for a working set of ``params``."""
    examples = {sig: layer_from_geometry(e.layer_example) for sig, e in entries.items()}
    for sig, cin, cout in todo:
        started = time.perf_counter()
        copies = copies_for(examples[sig], cin, cout, params)
        m = backend.time_layer(examples[sig], cin, cout, copies=copies)
        journal.add({"sig": sig, "cin": cin, "cout": cout, "pass": p, "copies": copies,
                     **m.to_dict()}, time.perf_counter() - started)
        bar.update()


def _measure_references(timers: Mapping[str, Callable[[], Measurement]], journal: Journal,
                        p: int, rounds: int) -> None:
    """The reference networks' ``rounds`` rounds of pass ``p``, interleaved so that a slow
    spell of the device falls on all of them alike."""
    for r in range(rounds):
        for name, timer in timers.items():
            if (p, r) not in journal.refs.get(name, {}):
                started = time.perf_counter()
                journal.add({"ref": name, "pass": p, "round": r, **timer().to_dict()},
                            time.perf_counter() - started)


def _assemble(spec: NetworkSpec, entries: dict[str, LutEntry], journal: Journal,
              refs: list[_Reference], described: BackendInfo,
              settings: _Settings) -> LatencyTable:
    """The table from the journal: each point's and reference's passes combined by the
    protocol's rule, then calibrated on the references when there are any."""
    for sig, entry in entries.items():
        entry.points = {k: combine(list(journal.points[(sig, *k)].values()))
                        for k in entry.points}
    measured = {name: combine(list(journal.refs[name].values())) for name, _, _ in refs}
    meta = {
        **described.to_dict(),
        "batch": int(spec.input_shape[0]),
        "created": utc_now(),
        "model": spec.model,
        "input_shape": list(spec.input_shape),
        "step": settings.step,
        "max_points": settings.max_points,
        "seed": settings.seed,
        "points": sum(len(e.points) for e in entries.values()),
        "passes": settings.passes,
        "protocol": settings.protocol,
        "build_s": round(journal.spent_s, 3),
        "dense": measured["dense"].to_dict() if measured else None,
    }
    table = LatencyTable(meta, entries)
    if measured:
        _calibrate(table, spec, refs, measured)
    return table


def _calibrate(table: LatencyTable, spec: NetworkSpec, refs: list[_Reference],
               measured: Mapping[str, Measurement]) -> None:
    """Set the table's ``scale`` and ``constant_ms`` from the fit of its raw sums to the
    measured references, and record the sums and the check in its meta."""
    lut_ms = {name: sum(table.layer_latencies(spec, counts, calibrated=False).values())
              for name, counts, _ in refs}
    cal = fit(*((lut_ms[name], measured[name].ms) for name, _, _ in refs))  # dense first
    table.dense_ms, table.scale, table.constant_ms = (measured["dense"].ms, cal.scale,
                                                      cal.constant_ms)
    table.meta["calibration"] = {
        name: {"lut_ms": lut_ms[name], "measured_ms": measured[name].ms,
               "counts": {str(g): c for g, c in counts.items()}}
        for name, counts, _ in refs}
    table.meta["check"] = cal.to_dict()
