"""The coupled latency–saliency knapsack: every layer priced at its true (cin, cout).

HALP's knapsack (:mod:`pipeline.knapsack`) charges each layer to its output group with the
input count frozen at today's value, so a step that shrinks several groups at once believes
the network costs more than it does and over-prunes. Here a layer costs
``lut.latency(layer, cin, cout)`` with cin from its input group's choice and cout from its
output group's: the network's latency is a constant, plus a term per group (layers touching one
sized group), plus a table per pair of groups (layers reading one and writing the other). The
value is the kept saliency, as in HALP. One choice per group maximises the value within a budget.

Two exact solvers:

- :func:`solve_milp`, the reference: a MILP for HiGHS (``scipy.optimize.milp``) with a binary
  per group choice and, per coupled pair of groups, a [0, 1] variable per pair of choices whose
  row and column sums equal the two groups' binaries, so it is their product wherever the
  binaries are integral (an exact linearisation).
- :func:`pipeline.coupled_dual.solve`, the fast path: Lagrangian relaxation of the budget,
  each relaxed problem solved exactly by variable elimination over the group graph
  (:mod:`pipeline.group_graph`). It returns a feasible choice and an upper bound on the
  optimum, hence a certified gap.

Block removal adds a count of zero to the inner groups of removable residual blocks: the block's
layers then cost nothing, and a +inf pair entry forbids a block's groups at zero apart. Both
solvers stay exact: HiGHS fixes the forbidden pairs' variables at 0, and the elimination, whose
relaxed problems never pick a forbidden pair, bounds the optimum over allowed choices only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import scipy.optimize
import scipy.sparse

from .errors import HalpError, InfeasibleBudget, NotCoupled
from .group_graph import Eliminator
from .spec import LayerSpec, NetworkSpec, ResidualBlock

if TYPE_CHECKING:  # only its methods are called: keeps this module free of torch
    from .lut import LatencyTable

#: relative gap HiGHS closes before it stops (its default, 1e-4, can stop 0.01% short)
MILP_GAP = 1e-6


@dataclass(frozen=True)
class Problem:
    """One choice per group; index k of a group's arrays is its k-th allowed count.

    ``pairs[(i, j)]`` (i < j, positions in :attr:`counts`) is the latency of the layers reading
    one group and writing the other, at ``[k_i, k_j]``; ``unary[g]`` that of the layers touching
    group g alone; ``constant`` everything else (layers of unsized groups, the table's constant).
    A pair entry of +inf is a pair of choices not allowed together (a removable block's groups
    at zero channels only all at once): never within budget, and never a relaxed optimum.
    """

    counts: list[np.ndarray]
    values: list[np.ndarray]
    unary: list[np.ndarray]
    pairs: dict[tuple[int, int], np.ndarray]
    constant: float

    def cost(self, keep: Sequence[int] | np.ndarray) -> float:
        """Predicted latency of choice ``keep[g]`` per group."""
        return math.fsum([self.constant, *(float(u[k]) for u, k in zip(self.unary, keep,
                                                                         strict=True)),
                          *(float(t[keep[i], keep[j]]) for (i, j), t in self.pairs.items())])

    def value(self, keep: Sequence[int] | np.ndarray) -> float:
        return math.fsum(float(v[k]) for v, k in zip(self.values, keep, strict=True))

    def restricted(self, picks: Sequence[np.ndarray]) -> Problem:
        """The problem over the choices ``picks[g]`` (indices) of each group only."""
        return Problem([c[p] for c, p in zip(self.counts, picks, strict=True)],
                       [v[p] for v, p in zip(self.values, picks, strict=True)],
                       [u[p] for u, p in zip(self.unary, picks, strict=True)],
                       {(i, j): t[np.ix_(picks[i], picks[j])] for (i, j), t in self.pairs.items()},
                       self.constant)

    @cached_property
    def graph(self) -> Eliminator:
        """The group graph, planned for exact maximisation (once per problem)."""
        return Eliminator([len(c) for c in self.counts], list(self.pairs))

    def relaxed(self, weight: float, rate: float) -> np.ndarray:
        """The choice maximising ``weight`` · value − ``rate`` · latency, without a budget
        (pairs not allowed together excluded, at rate 0 too)."""
        return self.graph.maximise([weight * v - rate * u for v, u in zip(self.values, self.unary,
                                                                          strict=True)],
                                   [-rate * t if rate > 0 else np.where(np.isinf(t), -np.inf, 0.0)
                                    for t in self.pairs.values()])

    def top(self) -> np.ndarray:
        """The most valuable allowed choice, budget ignored (each group's best, unless that
        splits a removable block)."""
        keep = np.array([int(np.argmax(v)) for v in self.values])
        return keep if math.isfinite(self.cost(keep)) else self.relaxed(1.0, 0.0)


def cheapest(problem: Problem) -> np.ndarray:
    """The fastest choice (exact over the coupled costs, values ignored)."""
    return problem.relaxed(0.0, 1.0)


@dataclass(frozen=True)
class Result:
    """A feasible choice per group, its value and latency, and an upper bound on the optimum."""

    keep: np.ndarray
    value: float
    cost: float
    bound: float

    @property
    def gap(self) -> float:
        """Certified relative gap: the optimum is at most this fraction above :attr:`value`."""
        return (self.bound - self.value) / self.bound if self.bound > 0 else 0.0


def network_problem(spec: NetworkSpec, lut: LatencyTable, counts: Mapping[int, np.ndarray],
                    values: Mapping[int, np.ndarray],
                    blocks: Sequence[ResidualBlock] = (), *,
                    network_params: int | None = None) -> Problem:
    """The coupled problem of ``spec`` priced by ``lut``: group ``g`` (keys of ``counts``, in
    order) may keep ``counts[g][k]`` channels, worth ``values[g][k]``; other groups stay dense.
    Every layer is priced in a network of ``network_params`` weights where given
    (:meth:`LatencyTable.latency`).

    Only the groups of removable ``blocks`` may offer a count of 0: the block removed, allowed
    when all its groups are at 0 (+inf pair entries otherwise), its layers then costing nothing
    (never a table query at zero channels).

    A ResNet-50 asks the table for tens of thousands of points (about a second, most of them
    interpolated): build once and take :meth:`Problem.restricted` copies, as the planner does.
    """
    keys = list(counts)
    position = {g: i for i, g in enumerate(keys)}
    options = [np.asarray(c, dtype=np.int64) for c in counts.values()]
    inside = _block_layers(keys, options, blocks)
    unary = [np.zeros(len(c)) for c in options]
    pairs: dict[tuple[int, int], np.ndarray] = {}
    constant = lut.constant_ms or 0.0
    for layer in spec.layers:
        touched = sorted({position[g] for g, _ in layer.in_sources if g in position}
                         | ({position[layer.out_group]} if layer.out_group in position else set()))
        if len(touched) > 2:
            raise NotCoupled(f"layer {layer.name} reads or writes {len(touched)} sized channel "
                            "groups; the coupled solver prices at most two per layer: use "
                            "solver='decoupled'")
        groups = [keys[i] for i in touched]

        def price(*chosen: int, layer: LayerSpec = layer, groups: list[int] = groups) -> float:
            if layer.name in inside and 0 in chosen:
                return 0.0  # its block removed (or not allowed: the ban below prices that)
            return lut.latency(layer, *layer.dims(dict(zip(groups, chosen, strict=True))),
                               network_params)

        if not touched:
            constant += price()
        elif len(touched) == 1:
            unary[touched[0]] += [price(int(c)) for c in options[touched[0]]]
        else:
            key = (touched[0], touched[1])
            grid = np.array([[price(int(a), int(b)) for b in options[key[1]]]
                             for a in options[key[0]]])
            pairs[key] = pairs[key] + grid if key in pairs else grid
    for block in blocks:  # a block's groups at zero together or not at all: a chain of bans
        chain = sorted(position[g] for g in block.groups)
        for i, j in itertools.pairwise(chain):
            ban = np.where((options[i] == 0)[:, None] != (options[j] == 0)[None, :], np.inf, 0.0)
            pairs[(i, j)] = pairs[(i, j)] + ban if (i, j) in pairs else ban
    return Problem(options, [np.asarray(v, dtype=np.float64) for v in values.values()], unary,
                   pairs, constant)


def _block_layers(keys: list[int], options: list[np.ndarray],
                  blocks: Sequence[ResidualBlock]) -> set[str]:
    """The layers of ``blocks``; HalpError where a zero count is offered outside them, or a
    block's groups are not all sized."""
    zeroable = {g for b in blocks for g in b.groups}
    for g, c in zip(keys, options, strict=True):
        if g not in zeroable and (c == 0).any():
            raise HalpError(f"group {g} is offered 0 channels but is no removable block's inner "
                            "group: only a removed block's groups may go to zero")
    for block in blocks:
        if not block.removable or not set(block.groups) <= set(keys):
            raise HalpError(f"block {block.name} is not removable here (its groups "
                            f"{block.groups} must all be sized; see `halp analyze`)")
    return {name for b in blocks for name in b.layers}


def infeasible(minimum: float, budget: float) -> InfeasibleBudget:
    """The error both solvers raise when nothing fits."""
    return InfeasibleBudget(f"latency budget {budget:.6g} ms is below the fastest network the "
                            f"coupled model allows ({minimum:.6g} ms); raise the budget",
                            minimum)


def solve_milp(problem: Problem, budget: float, *, time_limit: float | None = None) -> Result:
    """The exact optimum by HiGHS; ``bound`` is HiGHS's dual bound (equal to the value unless
    it stopped at ``time_limit`` or within :data:`MILP_GAP`).

    Variables: y (binary), one per group and choice, then z in [0, 1], one per coupled pair of
    groups and pair of their choices. Rows: Σ_k y_gk = 1 per group; per pair (i, j), the z of
    each choice of i summed over j's choices equal that y_i (and likewise for j); the budget.
    """
    sizes = [len(c) for c in problem.counts]
    start = np.concatenate(([0], np.cumsum(sizes)))
    n_y = int(start[-1])
    blocks = list(problem.pairs.items())
    offsets = np.concatenate(([n_y], n_y + np.cumsum([t.size for _, t in blocks])))
    n = int(offsets[-1])
    rows, cols, vals = [], [], []
    row = 0
    for g, size in enumerate(sizes):  # one choice per group
        rows += [row] * size
        cols += range(start[g], start[g] + size)
        vals += [1.0] * size
        row += 1
    for ((i, j), table), off in zip(blocks, offsets[:-1], strict=True):
        z = off + np.arange(table.size).reshape(table.shape)
        for axis, g in ((1, i), (0, j)):  # z summed over the other group's choices = y_g
            for k in range(sizes[g]):
                line = z[k] if axis == 1 else z[:, k]
                rows += [row] * (len(line) + 1)
                cols += [*line.tolist(), int(start[g] + k)]
                vals += [1.0] * len(line) + [-1.0]
                row += 1
    budget_row = row  # Σ latency of the chosen y and z within the budget
    cost = np.concatenate([*problem.unary, *(t.ravel() for _, t in blocks)])
    banned = np.isinf(cost)  # pairs of choices not allowed together: their z fixed at 0
    cost[banned] = 0.0
    rows += [row] * n
    cols += range(n)
    vals += cost.tolist()
    a = scipy.sparse.csr_array((vals, (rows, cols)), shape=(row + 1, n))
    lower = np.zeros(row + 1)
    upper = np.zeros(row + 1)
    lower[:len(sizes)] = upper[:len(sizes)] = 1.0
    lower[budget_row], upper[budget_row] = -np.inf, budget - problem.constant
    objective = np.concatenate([*[-v for v in problem.values], np.zeros(n - n_y)])
    options = {"mip_rel_gap": MILP_GAP, **({"time_limit": time_limit} if time_limit else {})}
    res = scipy.optimize.milp(objective, integrality=np.r_[np.ones(n_y), np.zeros(n - n_y)],
                              bounds=scipy.optimize.Bounds(0, np.where(banned, 0.0, 1.0)),
                              constraints=scipy.optimize.LinearConstraint(a, lower, upper),
                              options=options)
    if res.x is None:
        if res.status == 2:
            raise infeasible(problem.cost(cheapest(problem)), budget)
        raise HalpError(f"HiGHS found no solution: {res.message}")
    keep = np.array([int(np.argmax(res.x[start[g]:start[g + 1]])) for g in range(len(sizes))])
    return Result(keep, problem.value(keep), problem.cost(keep),
                  max(-float(res.mip_dual_bound), problem.value(keep)))
