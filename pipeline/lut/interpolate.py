"""Latency between the measured points of one signature: what a query off the grid returns.

The pruner asks for channel counts the table never measured (another unit, the true cin of a
layer whose input group shrank). Off the grid a query interpolates bilinearly, linearly along
the diagonal for depthwise convolutions, and says whether the value was exact, interpolated or
extrapolated so callers can tell a measurement from an estimate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .grid import LutEntry


class OutOfRange(Exception):
    """A query above the largest measured channel count of a signature."""


class Grid:
    """One signature's points as rows of equal cin, each sorted by cout, for fast queries.

    A query interpolates within the two rows bracketing cin (among the rows that reach the
    queried cout) and along cout within each row: bilinear on a rectangular grid, and still
    well defined on the union of several layers' grids. Below the smallest point it extrapolates
    linearly from the two smallest, clamped between proportional scaling of the smallest
    point (latency ∝ channels: no fixed overhead) and the smallest point's value.
    """

    def __init__(self, entry: LutEntry):
        self.diagonal = entry.diagonal
        self.exact = {k: m.ms for k, m in entry.points.items()}
        rows: dict[int, list[tuple[int, float]]] = {}
        for (cin, cout), ms in self.exact.items():
            rows.setdefault(0 if self.diagonal else cin, []).append((cout, ms))
        self.cins = np.array(sorted(rows), dtype=float)
        ordered = [sorted(rows[int(c)]) for c in self.cins]
        self.couts = [np.array([c for c, _ in r], dtype=float) for r in ordered]
        self.ms = [np.array([v for _, v in r], dtype=float) for r in ordered]
        self.top = np.array([c[-1] for c in self.couts])

    def value(self, cin: int, cout: int) -> tuple[float, str]:
        """(ms, "exact" | "interpolated" | "extrapolated"); OutOfRange above the grid."""
        if self.diagonal:
            cin = cout
        hit = self.exact.get((cin, cout))
        if hit is not None:
            return hit, "exact"
        rows = np.flatnonzero(self.top >= cout)
        if not rows.size or (not self.diagonal and cin > self.cins[rows[-1]]):
            raise OutOfRange
        if self.diagonal:
            ms, extra = _interp1(self.couts[0], self.ms[0], cout)
            return ms, "extrapolated" if extra else "interpolated"
        pos = int(np.searchsorted(self.cins[rows], cin))
        pick = rows[[pos - 1, pos]] if 0 < pos < rows.size else rows[:2]
        along = [_interp1(self.couts[r], self.ms[r], cout) for r in pick]
        ms, extra = _interp1(self.cins[pick], np.array([v for v, _ in along]), cin)
        extra = extra or any(e for _, e in along)
        return ms, "extrapolated" if extra else "interpolated"

    def span(self) -> tuple[int, int, int, int]:
        """(min cin, max cin, min cout, max cout) over the measured points."""
        keys = np.array(list(self.exact))
        return (int(keys[:, 0].min()), int(keys[:, 0].max()),
                int(keys[:, 1].min()), int(keys[:, 1].max()))


def _interp1(xs: np.ndarray, ys: np.ndarray, x: float) -> tuple[float, bool]:
    """Linear interpolation on sorted ``xs`` (``x <= xs[-1]``); (value, extrapolated below)."""
    if x >= xs[0] or len(xs) == 1:
        return float(np.interp(x, xs, ys)), bool(x < xs[0])
    slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    floor = ys[0] * max(x, 0.0) / xs[0]  # no cheaper than proportional to the channel count
    return float(min(max(ys[0] + slope * (x - xs[0]), floor), ys[0])), True
