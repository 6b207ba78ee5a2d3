"""The exact core of :func:`pipeline.knapsack.solve`: a multiple-choice knapsack over integer
weights, solved by a DP whose choices and states are pruned with LP (Lagrangian) bounds.

Every pruning step is exact: a choice or DP state is dropped only when its upper bound cannot
reach the value of a feasible solution already in hand, so an optimum always survives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Table:
    """The choices of all groups in flat arrays: groups contiguous, in order, none empty."""

    gid: np.ndarray  # group of the choice
    k: np.ndarray  # units kept
    v: np.ndarray  # value
    c: np.ndarray  # cost; integer cells once discretised
    starts: np.ndarray  # first row of each group

    @classmethod
    def of(cls, gid: np.ndarray, k: np.ndarray, v: np.ndarray, c: np.ndarray) -> Table:
        return cls(gid, k, v, c, np.flatnonzero(np.diff(gid, prepend=-1)))

    def take(self, rows: np.ndarray) -> Table:
        """The rows selected by a mask or index array (which must leave every group a row)."""
        return Table.of(self.gid[rows], self.k[rows], self.v[rows], self.c[rows])

    def cost(self, keep: np.ndarray) -> float:
        """True cost of one k per group; only for the full table, where row = start + k."""
        return math.fsum(self.c[self.starts + keep].tolist())


@dataclass(frozen=True)
class _Bounds:
    """Bounds from the LP relaxation, whose optimum fills hull edges best ratio first.

    ``rate`` is the value per cell of the edge that overflows the capacity (0 if none does).
    For any rate λ >= 0 and any feasible choice x, Σ v(x) <= λ (capacity - Σ w(x)) + Σ v(x)
    <= λ capacity + Σ_g max_k (v_gk - λ w_gk): a Lagrangian upper bound that fixes any part
    of x cheaply. ``lower`` is the value of a feasible choice built from whole hull edges.
    """

    rate: float
    lower: float

    @classmethod
    def of(cls, t: Table, capacity: int) -> _Bounds:
        gid, pos, w, v = _hull_edges(t)
        dw, dv = np.diff(w), np.diff(v)
        edge = gid[1:] == gid[:-1]
        order = np.argsort(-dv[edge] / dw[edge], kind="stable")
        gid, start, end = gid[1:][edge][order], pos[:-1][edge][order], pos[1:][edge][order]
        dw, dv = dw[edge][order], dv[edge][order]
        cut = int(np.searchsorted(np.cumsum(dw), capacity, side="right"))
        rate = float(dv[cut] / dw[cut]) if cut < len(dw) else 0.0
        at = [0] * len(t.starts)
        room = capacity
        for g, a, b, step in zip(gid.tolist(), start.tolist(), end.tolist(), dw.tolist(),
                                 strict=True):
            if at[g] == a and step <= room:
                at[g], room = b, room - step
        return cls(rate, math.fsum(t.v[t.starts + np.array(at)].tolist()))


def _hull_edges(t: Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(group, index in group, weight, value) of the points on each group's upper hull.

    A point strictly below the chord of its neighbours is not on the hull; removing all such
    points at once and repeating until none is left converges to the hull, in few rounds for
    the nearly concave curves saliency makes.
    """
    gid, w, v = t.gid, t.c.astype(np.float64), t.v
    alive = np.arange(len(w))
    while True:
        g, x, y = gid[alive], w[alive], v[alive]
        inner = (g[1:-1] == g[:-2]) & (g[1:-1] == g[2:])
        below = (y[1:-1] - y[:-2]) * (x[2:] - x[1:-1]) < (y[2:] - y[1:-1]) * (x[1:-1] - x[:-2])
        drop = np.flatnonzero(inner & below) + 1
        if len(drop) == 0:
            return g, alive - t.starts[g], x, y
        alive = np.delete(alive, drop)


def solve_cells(t: Table, capacity: int) -> np.ndarray:
    """Exact optimum over integer weights (``t.c``) within ``capacity``; returns k per group."""
    bounds = _Bounds.of(t, capacity)
    tol = 1e-9 * (1.0 + math.fsum(np.maximum.reduceat(t.v, t.starts).tolist()))
    need = bounds.lower - tol
    t, capacity = _reduce(t, capacity, bounds.rate, need)
    return _dp(t, capacity, bounds.rate, need)


def _slack(t: Table, rate: float) -> np.ndarray:
    """Per group, max_k (v - rate w): what the group adds to the Lagrangian bound."""
    return np.maximum.reduceat(t.v - rate * t.c, t.starts)


def _reduce(t: Table, capacity: int, rate: float, need: float) -> tuple[Table, int]:
    """Drop choices whose Lagrangian bound (everything else relaxed) stays below ``need``.

    Every choice of an optimal solution survives. Each group then restarts at weight 0 from
    its lightest survivor, whose weight leaves the capacity.
    """
    slack = _slack(t, rate)
    bound = rate * (capacity - t.c) + t.v + (slack.sum() - slack[t.gid])
    t = t.take(bound >= need)
    lightest = t.c[t.starts]
    return replace(t, c=t.c - lightest[t.gid]), capacity - int(lightest.sum())


def _dp(t: Table, capacity: int, rate: float, need: float) -> np.ndarray:
    """DP over the groups with a choice left, then backtrack; returns k per group.

    After each group, ``dp[i]`` holds the best value at total weight exactly ``lo + i``;
    states whose Lagrangian bound stays below ``need`` are trimmed from both ends of the range
    (those of an optimal solution never are). Groups down to one choice are constants.
    """
    keep = t.k[t.starts]
    ends = np.append(t.starts[1:], len(t.gid))
    free = np.flatnonzero(ends - t.starts > 1)
    need -= math.fsum(np.delete(t.v[t.starts], free).tolist())
    later = _slack(t, rate)[free]
    rest = later.sum() - np.cumsum(later)  # what the free groups after each one can add
    weights, values = t.c.tolist(), t.v.tolist()
    choices = [(weights[t.starts[g]:ends[g]], values[t.starts[g]:ends[g]])
               for g in free.tolist()]
    lo, dp = 0, np.zeros(1)
    history = []
    for (w, v), after in zip(choices, rest.tolist(), strict=True):
        history.append((lo, dp))
        lo, dp = _stage(lo, dp, w, v, capacity, rate, after, need)
    cell = lo + int(np.argmax(dp))
    for g, (w, v), (lo, dp) in zip(free[::-1].tolist(), choices[::-1], history[::-1],
                                   strict=True):
        j = _predecessor(cell, lo, dp, w, v)
        keep[g], cell = t.k[t.starts[g] + j], cell - w[j]
    return keep


def _stage(lo: int, dp: np.ndarray, w: list[int], v: list[float], capacity: int, rate: float,
           after: float, need: float) -> tuple[int, np.ndarray]:
    """Add one group to the DP, then trim states that cannot reach ``need``.

    ``after`` plus ``rate`` times the room left bounds what the later groups can still add.
    """
    new = np.full(min(lo + len(dp) - 1 + w[-1], capacity) - lo + 1, -np.inf)
    for wk, vk in zip(w, v, strict=True):
        n = min(len(dp), len(new) - wk)
        if n <= 0:
            break
        window = new[wk:wk + n]
        np.maximum(window, dp[:n] + vk, out=window)
    room = capacity - lo - np.arange(len(new))
    alive = np.flatnonzero(new + (rate * room + after) >= need)
    return lo + int(alive[0]), new[alive[0]:alive[-1] + 1]


def _predecessor(cell: int, lo: int, dp: np.ndarray, w: list[int], v: list[float]) -> int:
    """The choice that produced the best value at ``cell``: same float sums, same maximum.

    A handful of choices per group, so plain Python beats NumPy's per-call overhead here.
    """
    best, pick = -math.inf, 0
    for j, (wj, vj) in enumerate(zip(w, v, strict=True)):
        i = cell - wj - lo
        if 0 <= i < len(dp) and (total := float(dp[i]) + vj) > best:
            best, pick = total, j
    return pick
