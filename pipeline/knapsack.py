"""The latency–saliency knapsack, solved exactly as a multiple-choice knapsack.

Channels inside a group are kept best-first, so a pruning decision is one number per group: how
many units ``k`` it keeps. Maximising total saliency under a latency budget is then a
multiple-choice knapsack (one choice per group), which a dynamic programme over groups solves
exactly, instead of the paper's item-by-item table with its "previous unit must be kept" rule.

Speed comes from doing less work, never from approximating: costs are shifted by each group's
cheapest allowed choice, dominated choices are dropped, choices and DP states that provably
cannot reach the optimum are removed with an LP (Lagrangian) upper bound against a greedy lower
bound (:mod:`pipeline.knapsack_dp`), and every remaining step is a NumPy operation over all
choices or a whole range of capacities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import HalpError, InfeasibleBudget
from .knapsack_dp import Table, solve_cells

#: default discretisation: the capacity gets this many cells per group, so the budget lost to
#: rounding (at most one cell per group) is at most 1/DEFAULT_CELLS_PER_GROUP of the usable budget
DEFAULT_CELLS_PER_GROUP = 1000
#: refuse a resolution so fine that the DP would need more capacity cells than this
MAX_CELLS = 20_000_000

ArrayLike = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Solution:
    """One choice per group: ``keep[g]`` units; ``value`` and ``cost`` are the true sums."""

    keep: np.ndarray
    value: float
    cost: float


def solve(
    values: Sequence[ArrayLike],
    costs: Sequence[ArrayLike],
    budget: float,
    *,
    min_keep: int | ArrayLike | None = None,
    resolution: float | None = None,
) -> Solution:
    """Pick ``k_g`` per group maximising Σ values[g][k_g] subject to Σ costs[g][k_g] <= budget.

    ``values[g][k]`` is the saliency group g keeps with its best k units (``values[g][0] == 0``,
    non-decreasing); ``costs[g][k]`` its latency, any real numbers (latency staircases make
    marginal costs zero or negative). ``min_keep`` (int or one per group, default 1) is the
    fewest units a group may keep.

    Costs are discretised in steps of ``resolution`` after subtracting each group's cheapest
    allowed cost, and rounded *up*, so the returned cost never exceeds ``budget``. Rounding adds
    less than one step per group, hence the guarantee: the returned value is at least the exact
    optimum at budget ``budget - G * resolution`` (G groups), and never above the optimum at
    ``budget``. When the shifted costs are multiples of the resolution the answer is the exact
    optimum. By default ``resolution = (budget - minimum) / (1000 G)``, where ``minimum`` is
    the cheapest allowed architecture: the budget given up is at most 0.1% of the usable budget,
    well below the error of any latency model, for a DP of 1000 cells per group (1.0 when the
    budget equals the minimum: nothing above it fits whatever the step). Ties between
    equally valuable choices go to the smaller discretised cost. When the best choice of every
    group fits together, it is returned without discretising.

    Raises InfeasibleBudget (with ``.minimum``) when even the cheapest choice exceeds the
    budget, and HalpError for malformed input.
    """
    return _solve_table(_table(values, costs), budget, min_keep, resolution)


def _solve_table(table: Table, budget: float, min_keep: int | ArrayLike | None,
                 resolution: float | None) -> Solution:
    """``solve`` on an instance already validated and flattened."""
    if math.isnan(budget):
        raise HalpError("the latency budget is NaN; pass a number of milliseconds")
    if resolution is not None and not (math.isfinite(resolution) and resolution > 0):
        raise HalpError(f"resolution must be a positive number of cost units, got {resolution}")
    allowed = table.take(table.k >= _min_keep(min_keep, table)[table.gid])
    floors = np.minimum.reduceat(allowed.c, allowed.starts)
    minimum = math.fsum(floors.tolist())
    if budget < minimum:
        raise InfeasibleBudget(
            f"latency budget {budget:.6g} is below the cheapest allowed architecture "
            f"({minimum:.6g}, every group at its cheapest size with at least min_keep units); "
            "raise the budget or lower min_keep",
            minimum,
        )
    best = _unconstrained(allowed)
    if table.cost(best) <= budget:
        return _solution(table, best)
    span = budget - minimum
    step = _resolution(resolution, span, len(floors))
    capacity = math.floor(span / step)
    if capacity > MAX_CELLS:
        raise HalpError(
            f"resolution {step:.3g} needs {capacity} capacity cells (limit {MAX_CELLS}); "
            f"use resolution >= {span / MAX_CELLS:.3g} or the default"
        )
    while True:
        keep = solve_cells(_discretise(allowed, floors, step, capacity), capacity)
        # Float rounding of shifted costs can, in rare exact-tie cases, push the true sum a hair
        # over the budget; one cell less restores the guarantee (capacity 0 is always feasible).
        if table.cost(keep) <= budget:
            return _solution(table, keep)
        capacity -= 1


def _solution(table: Table, keep: np.ndarray) -> Solution:
    """``keep`` (k per group of the full table) with its true value and cost."""
    value = math.fsum(table.v[table.starts + keep].tolist())
    return Solution(keep=keep.astype(np.int64), value=value, cost=table.cost(keep))


def solve_units(
    unit_saliency: Sequence[ArrayLike],
    unit_latency_delta: Sequence[ArrayLike],
    budget: float,
    *,
    base_cost: float = 0.0,
    min_keep: int | ArrayLike | None = None,
    resolution: float | None = None,
) -> Solution:
    """The paper's view: per group, unit saliencies best first and the latency each unit adds.

    Keeping k units of group g is worth the sum of its first k saliencies and costs the sum of
    its first k latency deltas; ``base_cost`` is the latency of everything no group owns and is
    included in the budget check and in ``Solution.cost``.
    """
    table = _unit_table(unit_saliency, unit_latency_delta, base_cost)
    return _solve_table(table, budget, min_keep, resolution)

def _flat(arrays: Sequence[ArrayLike], name: str) -> tuple[np.ndarray, np.ndarray]:
    """All groups' entries in one float array, and each group's length; one validation pass
    over the whole instance (the pruner solves thousands of these)."""
    parts = [np.asarray(x, dtype=np.float64) for x in arrays]
    if (g := _first(np.array([p.ndim != 1 for p in parts]))) is not None:
        raise HalpError(f"{name}[{g}] must be a 1-D array, got shape {parts[g].shape}")
    sizes = np.array([len(p) for p in parts])
    flat = np.concatenate(parts)
    if (i := _first(~np.isfinite(flat))) is not None:
        g = int(np.searchsorted(np.cumsum(sizes), i, side="right"))
        raise HalpError(f"{name}[{g}] contains NaN or infinity; pass finite numbers")
    return flat, sizes


def _table(values: Sequence[ArrayLike], costs: Sequence[ArrayLike]) -> Table:
    """Validate the instance and flatten it."""
    if len(values) == 0:
        raise HalpError("no groups given: pass at least one values/costs array")
    if len(values) != len(costs):
        raise HalpError(f"{len(values)} value arrays but {len(costs)} cost arrays; "
                        "pass one of each per group")
    vals, sizes = _flat(values, "values")
    csts, cost_sizes = _flat(costs, "costs")
    if (g := _first(sizes == 0)) is not None:
        raise HalpError(f"values[{g}] is empty; each group needs at least the entry for k = 0")
    if (g := _first(sizes != cost_sizes)) is not None:
        raise HalpError(f"group {g}: {sizes[g]} values but {cost_sizes[g]} costs; both are "
                        "indexed by the number of units kept, k = 0..K")
    gid = np.repeat(np.arange(len(sizes)), sizes)
    table = Table.of(gid, np.arange(len(gid)) - np.repeat(np.cumsum(sizes) - sizes, sizes),
                      vals, csts)
    if (g := _first(table.v[table.starts] != 0)) is not None:
        raise HalpError(f"group {g}: values[{g}][0] is {table.v[table.starts[g]]:.6g}; keeping "
                        "no units is worth 0 (subtract it from the group's values)")
    if (i := _first((np.diff(table.v) < 0) & (np.diff(gid) == 0))) is not None:
        g, k = int(gid[i + 1]), int(table.k[i + 1])
        raise HalpError(f"group {g}: values decrease at k={k} ({table.v[i]:.6g} -> "
                        f"{table.v[i + 1]:.6g}); values must be cumulative sums of saliencies "
                        ">= 0")
    return table


def _unit_table(saliency: Sequence[ArrayLike], delta: Sequence[ArrayLike],
                base_cost: float) -> Table:
    """Validate the paper's per-unit view and flatten it into cumulative choices.

    Each group's running sums are taken along the rows of one zero-padded matrix, so they are
    the same sequential float sums as a per-group ``np.cumsum``, without a loop over groups.
    """
    if len(saliency) != len(delta):
        raise HalpError(f"{len(saliency)} groups of saliencies but {len(delta)} groups of "
                        "latency deltas; pass one array of each per group")
    if len(saliency) == 0:
        raise HalpError("no groups given: pass at least one saliency/delta array")
    if not math.isfinite(base_cost):
        raise HalpError(f"base_cost must be a finite latency, got {base_cost}")
    sal, sizes = _flat(saliency, "unit_saliency")
    lat, lat_sizes = _flat(delta, "unit_latency_delta")
    if (g := _first(sizes != lat_sizes)) is not None:
        raise HalpError(f"group {g}: {sizes[g]} unit saliencies but {lat_sizes[g]} latency "
                        "deltas; pass one of each per unit")
    if (i := _first(sal < 0)) is not None:
        g = int(np.searchsorted(np.cumsum(sizes), i, side="right"))
        raise HalpError(f"group {g}: unit saliencies must be >= 0 (got {sal[i]:.6g})")
    k = np.arange(int(sizes.max()) + 1)
    units, rows = (k >= 1) & (k <= sizes[:, None]), k <= sizes[:, None]
    padded = np.zeros((len(sizes), len(k)))
    padded[units] = sal
    v = np.cumsum(padded, axis=1)[rows]
    padded[units] = lat
    padded[0, 0] = base_cost
    c = np.cumsum(padded, axis=1)[rows]
    gid = np.repeat(np.arange(len(sizes)), sizes + 1)
    return Table.of(gid, np.broadcast_to(k, rows.shape)[rows], v, c)


def _first(mask: np.ndarray) -> int | None:
    """Index of the first True, to name the first offending group in an error."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _min_keep(min_keep: int | ArrayLike | None, table: Table) -> np.ndarray:
    """Per-group lowest allowed k, checked against the group sizes."""
    n = len(table.starts)
    lows = np.asarray(1 if min_keep is None else min_keep)
    if lows.ndim == 0:
        lows = np.full(n, lows)
    if lows.shape != (n,) or not np.issubdtype(lows.dtype, np.integer):
        raise HalpError(f"min_keep must be an int or {n} ints (one per group), got {min_keep!r}")
    units = np.diff(table.starts, append=len(table.gid)) - 1
    if (g := _first((lows < 0) | (lows > units))) is not None:
        raise HalpError(f"group {g}: min_keep={lows[g]} but the group has {units[g]} units; "
                        "use 0 <= min_keep <= units")
    return lows


def _resolution(resolution: float | None, span: float, n_groups: int) -> float:
    if resolution is not None:
        return float(resolution)
    step = span / (DEFAULT_CELLS_PER_GROUP * n_groups)
    return step if step > 0 else 1.0  # a subnormal span underflows: only the floors fit


def _unconstrained(t: Table) -> np.ndarray:
    """Each group's best choice ignoring the budget: highest value, then cheapest."""
    return t.k[np.lexsort((t.c, -t.v, t.gid))[t.starts]]


def _discretise(t: Table, floors: np.ndarray, step: float, capacity: int) -> Table:
    """Choices as (cells, value), rounded up, minus those that never fit or are dominated.

    Rows end sorted by weight within each group; a choice is dominated when another of its group
    is no heavier and worth at least as much, so the survivors strictly increase in both. The
    running maximum runs over (group, value rank) keys, which resets it at each group exactly.
    """
    cells = np.ceil((t.c - floors[t.gid]) / step)
    fits = cells <= capacity
    t = Table.of(t.gid[fits], t.k[fits], t.v[fits], cells[fits].astype(np.int64))
    t = t.take(np.lexsort((-t.v, t.c, t.gid)))
    key = t.gid * len(t.v) + np.unique(t.v, return_inverse=True)[1]
    return t.take(key > np.maximum.accumulate(np.concatenate(([-1], key[:-1]))))
