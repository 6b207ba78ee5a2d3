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
class _Step:
    """Eliminate ``var``: add the tables ``inputs`` over ``scope`` (sorted, holding ``var``),
    maximise over ``var``, leaving a table over the rest of the scope."""

    var: int
    scope: tuple[int, ...]
    inputs: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]  # each input reshaped to broadcast over ``scope``

    @property
    def rest(self) -> tuple[int, ...]:
        return tuple(v for v in self.scope if v != self.var)


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
            shapes = tuple(tuple(self.sizes[v] if v in scopes[f] else 1 for v in scope)
                           for f in inputs)
            step = _Step(var, scope, inputs, shapes)
            self.steps.append(step)
            active = (active - set(inputs)) | {len(scopes)}
            scopes.append(step.rest)
            for v in step.rest:
                neighbours[v] |= set(step.rest) - {v}
            alive.remove(var)

    def maximise(self, unary: Sequence[np.ndarray], pairs: Sequence[np.ndarray]
                 ) -> np.ndarray:
        """The value index per variable maximising Σ unary[g][x_g] + Σ pairs[e][x_i, x_j]
        (``pairs`` in the order of ``edges``); ties go to the lowest index eliminated last."""
        tables = [*unary, *pairs]
        choices = []
        for step in self.steps:
            total = sum(tables[f].reshape(shape) for f, shape in
                        zip(step.inputs, step.shapes, strict=True))
            axis = step.scope.index(step.var)
            best = np.argmax(total, axis=axis)
            tables.append(np.take_along_axis(total, np.expand_dims(best, axis), axis)
                          .squeeze(axis))
            choices.append(best)
        keep = np.zeros(len(self.sizes), dtype=np.int64)
        for step, best in zip(reversed(self.steps), reversed(choices), strict=True):
            keep[step.var] = best[tuple(keep[v] for v in step.rest)]
        return keep
