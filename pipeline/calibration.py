"""Calibrating per-layer LUT entries against whole networks: measured ≈ scale · Σ entries + b.

A layer timed alone is not quite the same layer inside a network: there its weights compete for
cache with every other layer's, and the ops the table does not model (pooling, adds, the
runtime's per-node work) cost something too. Part of that difference is fixed (``constant_ms``),
part grows with the layers (``scale``). One dense measurement can only pin the constant; the
dense network plus copies with every prunable group at half and at a quarter width pin both, as
the least-squares line through the three.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import StructureError
from .slim import slim
from .structure import NetworkSpec

#: a fitted scale outside this range means the two references were measured too noisily to
#: separate the factor from the constant; the constant alone is used then
SCALE_RANGE = (0.5, 2.0)

#: reduced-width reference networks: the fraction of each group's channels they keep
REFERENCES = {"half": 0.5, "quarter": 0.25}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    scale: float
    constant_ms: float

    def predict(self, layers_ms: float) -> float:
        return self.scale * layers_ms + self.constant_ms


def fit(*points: tuple[float, float]) -> Calibration:
    """From (Σ LUT entries, measured ms) of the reference networks, dense first: the
    least-squares line through them, or the dense offset alone."""
    (lut_d, ms_d), spread = points[0], max(p[0] for p in points) - min(p[0] for p in points)
    if len(points) > 1 and spread > 1e-9 * max(lut_d, 1e-12):
        scale, constant = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
        if SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
            return Calibration(float(scale), float(constant))
        log.warning("calibration scale %.3g is implausible (measurements too noisy); using "
                    "the dense constant only", scale)
    return Calibration(1.0, ms_d - lut_d)


def scaled_counts(spec: NetworkSpec, fraction: float, step: int = 8) -> dict[int, int]:
    """Every group the latency model can size at about ``fraction`` of its width, in multiples
    of ``step``."""
    counts = {}
    for gid in spec.sizable_groups():
        channels = spec.group(gid).channels
        counts[gid] = min(channels, max(step, round(channels * fraction / step) * step))
    return counts


def references(model: nn.Module, example_input: torch.Tensor, spec: NetworkSpec,
               step: int = 8) -> list[tuple[str, dict[int, int], nn.Module]]:
    """The networks to calibrate on: ("dense", counts, model) and, where the model can be
    slimmed, copies with every sizable group at half and at a quarter of its width."""
    refs = [("dense", spec.dense_counts(), model)]
    for name, fraction in REFERENCES.items():
        counts = scaled_counts(spec, fraction, step)
        keep = {g: c for g, c in counts.items() if c < spec.group(g).channels}
        if not keep:
            continue
        try:
            refs.append((name, {**spec.dense_counts(), **counts},
                         slim(model, example_input, keep, spec=spec)))
        except StructureError as exc:
            log.warning("no %s-width calibration reference (%s)", name, exc)
    return refs
