"""Checking per-layer LUT entries against whole networks: measured ≈ scale · Σ entries + b.

The table's entries are measured the way each layer runs inside the network (packed with the
network's working set of weights, :data:`pipeline.lut.PROTOCOL`), so their raw sum should
explain the dense network by itself. The fit through the dense network and copies with every
prunable group at half and at a quarter width is a check and a small correction: the runtime's
per-run work and the ops the table does not price (pooling, flatten) land in ``constant_ms``.
A fit that needs a scale outside :data:`SCALE_RANGE` or a negative constant means the table
does not describe this device, and it is reported loudly rather than absorbed.

Torch-free: the fit runs wherever the references are measured, a device without torch
included (:mod:`pipeline.device`); the reference networks themselves are made by
:func:`pipeline.references.references`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .spec import NetworkSpec

#: the correction a sound table may need: beyond it the table and the device disagree
SCALE_RANGE = (0.85, 1.15)
#: raw additivity (Σ dense entries / measured dense) outside 1 ± this is reported
ADDITIVITY_TOLERANCE = 0.15
#: a constant below -this fraction of the dense network is reported; closer to zero it is
#: within what two measurements of the same network differ by on a shared CPU
CONSTANT_FLOOR = 0.02

#: reduced-width reference networks: the fraction of each group's channels they keep
REFERENCES = {"half": 0.5, "quarter": 0.25}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    scale: float
    constant_ms: float
    #: raw Σ entries / measured ms of the dense network (1.0: the table explains it alone)
    additivity: float = 1.0
    #: what disagreed (empty when the table and the device agree)
    warnings: tuple[str, ...] = ()

    def predict(self, layers_ms: float) -> float:
        return self.scale * layers_ms + self.constant_ms

    def to_dict(self) -> dict:
        return {"scale": self.scale, "constant_ms": self.constant_ms,
                "additivity": self.additivity, "warnings": list(self.warnings)}


def fit(*points: tuple[float, float]) -> Calibration:
    """From (Σ LUT entries, measured ms) of the reference networks, dense first: the
    least-squares line through them, kept within :data:`SCALE_RANGE` and a constant of at
    least -:data:`CONSTANT_FLOOR` x the dense network.

    When the free fit leaves those bounds, the best line inside them is used and the
    calibration carries warnings that say how far off the table is; they are also logged.
    """
    xs = np.array([p[0] for p in points], dtype=float)
    ys = np.array([p[1] for p in points], dtype=float)
    additivity = float(xs[0] / ys[0]) if ys[0] > 0 else float("inf")
    warnings = []
    if abs(additivity - 1.0) > ADDITIVITY_TOLERANCE:
        warnings.append(
            f"the table's entries sum to {100 * additivity:.0f}% of the measured dense network "
            f"({xs[0]:.4g} vs {ys[0]:.4g} ms; a sound table is within "
            f"±{100 * ADDITIVITY_TOLERANCE:.0f}%)")
    free = _line(xs, ys)
    scale, constant = _bounded(xs, ys, free, floor=-CONSTANT_FLOOR * float(ys[0]))
    if (scale, constant) != free:
        warnings.append(
            f"the fit through {len(points)} reference network(s) needs scale {free[0]:.3g} "
            f"and constant {free[1]:+.3g} ms (allowed: scale {SCALE_RANGE[0]}..{SCALE_RANGE[1]},"
            f" constant >= {-CONSTANT_FLOOR:g} x dense); using scale {scale:.3g}, constant "
            f"{constant:.3g} ms")
    for text in warnings:
        log.warning("latency table check: %s. The layers are not timed the way this device "
                    "runs them inside the network: rebuild the table on the target, and see "
                    "`halp lut show` for the entries that weigh most", text)
    return Calibration(scale, constant, additivity, tuple(warnings))


def _line(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float]:
    """The (scale, constant) with the least squared *relative* errors; with one point (or no
    spread) the dense offset. Relative, because predictions are judged by their relative error
    and because the dense network, whose weights stream from the furthest memory, is also the
    one its neighbours on a shared machine slow down most: an absolute fit lets its 5-10% swings
    between runs set the scale for every pruned network."""
    if len(xs) > 1 and np.ptp(xs) > 1e-9 * max(float(xs[0]), 1e-12):
        scale, constant = np.polyfit(xs, ys, 1, w=1.0 / ys)
        return float(scale), float(constant)
    return 1.0, float(ys[0] - xs[0])


def _bounded(xs: np.ndarray, ys: np.ndarray, free: tuple[float, float],
             floor: float) -> tuple[float, float]:
    """``free`` when its scale is in :data:`SCALE_RANGE` and its constant above ``floor``;
    else the line of least squared relative errors inside those same bounds. The objective is
    convex, so outside ``free`` the best line lies on the region's edge: the best constant at
    either end of the scale range, or the best scale with the constant at ``floor``.

    (Until 2026-11-30 the constant was held at zero here. At 1x3x32x32 that dropped a fit
    needing -0.032 ms to a scale through zero of 0.88, set by the quarter-width network, and the
    mid-size networks the knapsack picks came out 8-11% fast: docs/BENCHMARKS.md.)"""
    lo, hi = SCALE_RANGE
    if lo <= free[0] <= hi and free[1] >= floor:
        return free
    w = 1.0 / ys ** 2

    def constant(s: float) -> float:
        return max(floor, float(w @ (ys - s * xs) / w.sum()))

    at_floor = float(np.clip((w @ (xs * (ys - floor))) / (w @ xs ** 2), lo, hi))
    candidates = [(lo, constant(lo)), (hi, constant(hi)), (at_floor, floor)]
    return min(candidates, key=lambda sc: float(w @ (sc[0] * xs + sc[1] - ys) ** 2))


def scaled_width(channels: int, fraction: float, step: int) -> int:
    """About ``fraction`` of ``channels`` in multiples of ``step`` (at least one, at most all):
    a reference network's width, which the table's grid also holds (:mod:`pipeline.lut.grid`)."""
    return min(channels, max(step, round(channels * fraction / step) * step))


def scaled_counts(spec: NetworkSpec, fraction: float, step: int = 8) -> dict[int, int]:
    """Every group the latency model can size at about ``fraction`` of its width, in multiples
    of ``step``."""
    return {gid: scaled_width(spec.group(gid).channels, fraction, step)
            for gid in spec.sizable_groups()}
