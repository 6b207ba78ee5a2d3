"""Building a latency table from a model: plan its points, slim and export the calibration
references, and measure them all (:func:`pipeline.lut.measure.measure_table`).

This is the only part of :mod:`pipeline.lut` that needs torch and Torch-Pruning (to slim the
reference networks), so ``pipeline.lut`` imports it on first use of :func:`build_lut`. A device
without torch measures a table planned here (:func:`plan_job`) with :mod:`pipeline.device`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..backends import Backend
from ..export import to_onnx
from ..references import references
from ..spec import NetworkSpec
from .grid import plan
from .job import Job, JobReference
from .measure import Reference, Settings, measure_table, protocol
from .table import LatencyTable


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
    """Measure every (signature, cin, cout) point ``spec`` needs and write the table to ``out``
    (:func:`~pipeline.lut.measure.measure_table`: seeded shuffled passes, journaled to
    ``<out>.journal`` so a rerun measures only what is missing).

    With ``model``, the dense network and copies slimmed to half and a quarter width are
    measured too and the table is calibrated on them (:mod:`pipeline.calibration`): ``scale``
    and ``constant_ms`` such that scale · Σ entries + constant fits them.
    """
    step = step or backend.default_step
    settings = Settings(step, max_points, seed, passes, protocol(spec))
    x = example_input if example_input is not None else torch.randn(*spec.input_shape)

    def refs() -> list[Reference]:
        if model is None:
            return []
        return [(name, counts, backend.module_timer(module, x))
                for name, counts, module in references(model, x, spec, step)]

    return measure_table(spec, plan(spec, step, max_points), backend, settings, Path(out),
                         refs, model=spec.model, progress=progress)


def plan_job(spec: NetworkSpec, model: nn.Module, example_input: torch.Tensor, *, step: int,
             max_points: int | None, passes: int, out: str | Path, seed: int = 0) -> Job:
    """Plan the table of :func:`build_lut` for a device without torch (:mod:`pipeline.device`):
    write the job to ``out`` and the reference networks, exported to ONNX, to ``<out>.refs/``.
    """
    settings = Settings(step, max_points, seed, passes, protocol(spec))
    out = Path(out)
    folder = out.parent / f"{out.name}.refs"
    refs = []
    for name, counts, module in references(model, example_input, spec, step):
        path = folder / f"{name}.onnx"
        proto = to_onnx(module, example_input, path, check=False)
        refs.append(JobReference(name, counts, str(path.relative_to(out.parent)),
                                 proto.graph.input[0].name))
    job = Job(spec.model or "", spec, settings, plan(spec, step, max_points), refs)
    job.save(out)
    return job
