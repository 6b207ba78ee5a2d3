"""Building a latency table from a model: plan its points, slim and export the calibration
references, and measure them all (:func:`pipeline.lut.measure.measure_table`).

This is the only part of :mod:`pipeline.lut` that needs torch and Torch-Pruning (to slim the
reference networks), so ``pipeline.lut`` imports it on first use of :func:`build_lut`. A device
without torch measures a table planned here with :mod:`pipeline.device` instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..backends import Backend
from ..references import references
from ..spec import NetworkSpec
from .grid import plan
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
    settings.check()
    x = example_input if example_input is not None else torch.randn(*spec.input_shape)

    def refs() -> list[Reference]:
        if model is None:
            return []
        return [(name, counts, backend.module_timer(module, x))
                for name, counts, module in references(model, x, spec, step)]

    return measure_table(spec, plan(spec, step, max_points), backend, settings, Path(out),
                         refs, model=spec.model, progress=progress)
