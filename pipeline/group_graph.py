"""Exact maximisation of a sum of per-group and per-pair tables over the group graph.

The coupled knapsack's relaxed problems (:mod:`pipeline.coupled_dual`) and its fastest network
(:func:`pipeline.coupled.cheapest`) are all ``max Σ_g u_g(x_g) + Σ_(i,j) p_ij(x_i, x_j)`` on the
graph whose edges are layers reading one group and writing another. Variable elimination solves
it exactly in time exponential only in the graph's treewidth, which is small for real networks
(a ResNet stage is triangles around its residual group; a chain of blocks stays a chain). The
order and every intermediate scope depend on the graph alone, so they are planned once and each
call only fills tables with NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import NotCoupled

#: refuse an elimination whose largest intermediate table would hold more entries than this
MAX_TABLE = 50_000_000


@dataclass(frozen=True)
class _Part:
    """Inputs of a step summed over the largest of their scopes while still small, so the
    step's full table is one broadcast sum of a few parts, not of every input."""

    inputs: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]  # each input reshaped to broadcast over the part
    shape: tuple[int, ...]  # the part reshaped to broadcast over the step's scope


@dataclass(frozen=True)
class _Step:
    """Eliminate ``var``: add the parts over ``scope`` (sorted, holding ``var``), maximise over
    ``var``, leaving a table over the rest of the scope."""

    var: int
    scope: tuple[int, ...]
    parts: tuple[_Part, ...]

    @property
    def axis(self) -> int:
        return self.scope.index(self.var)

    @property
    def rest(self) -> tuple[int, ...]:
        return tuple(v for v in self.scope if v != self.var)


def _shape(sizes: Sequence[int], scope: Sequence[int], within: Sequence[int]
           ) -> tuple[int, ...]:
    """A table over ``scope`` reshaped to broadcast over ``within`` (which holds it)."""
    return tuple(sizes[v] if v in scope else 1 for v in within)


def _parts(sizes: Sequence[int], scope: tuple[int, ...], inputs: Sequence[int],
           scopes: Sequence[tuple[int, ...]]) -> tuple[_Part, ...]:
    """The inputs grouped under the largest of their scopes that hold them (each input in the
    first such scope)."""
    tops = sorted({scopes[f] for f in inputs
                   if not any(set(scopes[f]) < set(scopes[h]) for h in inputs)})
    members: dict[tuple[int, ...], list[int]] = {top: [] for top in tops}
    for f in inputs:
        members[next(t for t in tops if set(scopes[f]) <= set(t))].append(f)
    return tuple(_Part(tuple(fs), tuple(_shape(sizes, scopes[f], top) for f in fs),
                       _shape(sizes, top, scope)) for top, fs in members.items())


class Eliminator:
    """Plans the elimination of ``len(sizes)`` variables (``sizes[g]`` values each) coupled by
    ``edges`` (pairs i < j), smallest intermediate table first; then maximises sums of tables
    over them."""

    def __init__(self, sizes: Sequence[int], edges: Sequence[tuple[int, int]]):
        self.sizes = list(sizes)
        self.edges = list(edges)
        scopes: list[tuple[int, ...]] = [(g,) for g in range(len(sizes))] + self.edges
        neighbours: list[set[int]] = [set() for _ in sizes]
        for i, j in self.edges:
            neighbours[i].add(j)
            neighbours[j].add(i)
        active, alive = set(range(len(scopes))), set(range(len(sizes)))
        self.steps: list[_Step] = []
        while alive:
            var = min(alive, key=lambda v: (math.prod(self.sizes[u] for u in neighbours[v]
                                                      & alive) * self.sizes[v], v))
            inputs = tuple(sorted(f for f in active if var in scopes[f]))
            scope = tuple(sorted(set().union(*(scopes[f] for f in inputs))))
            if math.prod(self.sizes[v] for v in scope) > MAX_TABLE:
                raise NotCoupled(f"the channel groups are too densely coupled for the coupled "
                                f"solver (an intermediate table over {len(scope)} groups); use "
                                "solver='decoupled'")
            step = _Step(var, scope, _parts(self.sizes, scope, inputs, scopes))
            self.steps.append(step)
            active = (active - set(inputs)) | {len(scopes)}
            scopes.append(step.rest)
            for v in step.rest:
                neighbours[v] |= set(step.rest) - {v}
            alive.remove(var)

    def maximise(self, unary: Sequence[np.ndarray], pairs: Sequence[np.ndarray]
                 ) -> np.ndarray:
        """The value index per variable maximising Σ unary[g][x_g] + Σ pairs[e][x_i, x_j]
        (``pairs`` in the order of ``edges``); ties go to the lowest index eliminated last.

        Only maxima are tabulated: the maximising value of each variable is found on the way
        back, along one line of its step's parts, at the values chosen for the rest.
        """
        tables = [*unary, *pairs]
        sums = []
        for step in self.steps:
            parts = [sum(tables[f].reshape(shape) for f, shape in
                         zip(part.inputs, part.shapes, strict=True)).reshape(part.shape)
                     for part in step.parts]
            tables.append(sum(parts[1:], parts[0]).max(axis=step.axis))
            sums.append(parts)
        keep = np.zeros(len(self.sizes), dtype=np.int64)
        for step, parts in zip(reversed(self.steps), reversed(sums), strict=True):
            line = [part[tuple(slice(None) if v == step.var else keep[v] if n > 1 else 0
                               for v, n in zip(step.scope, part.shape, strict=True))]
                    for part in parts]
            keep[step.var] = int(np.argmax(sum(line[1:], line[0])))
        return keep
