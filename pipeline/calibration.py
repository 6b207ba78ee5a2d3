"""Calibrating per-layer LUT entries against whole networks: measured ≈ scale · Σ entries + b.

A layer timed alone is not quite the same layer inside a network: there its weights compete for
cache with every other layer's, and the ops the table does not model (pooling, adds, the
runtime's per-node work) cost something too. Part of that difference is fixed (``constant_ms``),
part grows with the layers (``scale``). One dense measurement can only pin the constant; a
second reference network, the dense one with every prunable group at half width, pins both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .errors import StructureError
from .slim import slim
from .structure import NetworkSpec

#: a fitted scale outside this range means the two references were measured too noisily to
#: separate the factor from the constant; the constant alone is used then
SCALE_RANGE = (0.5, 2.0)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    scale: float
    constant_ms: float

    def predict(self, layers_ms: float) -> float:
        return self.scale * layers_ms + self.constant_ms


def fit(dense: tuple[float, float], half: tuple[float, float] | None = None) -> Calibration:
    """From (Σ LUT entries, measured ms) of the dense network and, if measured, of the
    half-width reference: the line through both, or the dense offset alone."""
    lut_d, ms_d = dense
    if half is not None and lut_d - half[0] > 1e-9:
        scale = (ms_d - half[1]) / (lut_d - half[0])
        if SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
            return Calibration(scale, ms_d - scale * lut_d)
        log.warning("calibration scale %.3g is implausible (measurements too noisy); using "
                    "the dense constant only", scale)
    return Calibration(1.0, ms_d - lut_d)


def half_counts(spec: NetworkSpec, step: int = 8) -> dict[int, int]:
    """Every group the latency model can size at about half width, in multiples of ``step``."""
    counts = {}
    for gid in spec.sizable_groups():
        channels = spec.group(gid).channels
        counts[gid] = min(channels, max(step, round(channels / 2 / step) * step))
    return counts


def references(model: nn.Module, example_input: torch.Tensor, spec: NetworkSpec,
               step: int = 8) -> list[tuple[str, dict[int, int], nn.Module]]:
    """The networks to calibrate on: ("dense", counts, model) and, where the model can be
    slimmed, ("half", counts, half-width copy)."""
    refs = [("dense", spec.dense_counts(), model)]
    counts = half_counts(spec, step)
    keep = {g: c for g, c in counts.items() if c < spec.group(g).channels}
    if keep:
        try:
            refs.append(("half", {**spec.dense_counts(), **counts},
                         slim(model, example_input, keep, spec=spec)))
        except StructureError as exc:
            log.warning("no half-width calibration reference (%s); using the dense constant "
                        "only", exc)
    return refs
