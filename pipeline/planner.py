"""Planner: which channels HALP keeps, decided from a network spec and a latency table alone.

Every pruning decision lives here, apart from the model: the pruning units, the exponential
budget schedule, the exact latency-saliency knapsack, tightening against the true (cin, cout)
prediction, the greedy fallback, and the feasible minimum. Plain data in and out (a
:class:`NetworkSpec`, a :class:`LatencyTable`, per-channel scores as arrays), no torch: the
pruner, `halp verify` and tests share one implementation and can use it without a model.

Formulation (DESIGN.md, "Knapsack"): channels of group g are ranked best first; keeping
``c`` of them is worth the saliency of the best ``c``. Two solvers pick one count per group:

- ``"coupled"`` (default): each layer costs its table entry at (cin from its input group's
  choice, cout from its output group's), so the step optimises the true prediction
  (:mod:`pipeline.coupled`, solved by :mod:`pipeline.coupled_dual` with a certified gap). The
  decoupled answer is computed too and kept when it is worth more within the budget, so
  ``"coupled"`` is never worse; it is also the answer where the network cannot be priced
  coupled (a layer touching more than two sized groups, or a group graph too densely coupled
  to eliminate: :class:`~pipeline.errors.NotCoupled`).
- ``"decoupled"`` (HALP's): the layers producing g cost (today's input count, c); the result
  is re-predicted with every layer's true (cin, cout) and the budget tightened until the
  prediction fits. One big step over-prunes; the pruner's schedule takes small ones.
- ``"highs"``: the coupled problem solved exactly as a MILP by HiGHS (the reference; seconds).

Block removal (``block_removal=True``, MDP's depth pruning): the inner groups of each removable
residual block (:attr:`NetworkSpec.removable_blocks`) may also go to zero channels, all of them
at once, and the block is then removed: its layers leave the cost and its channels the value,
and slimming replaces it with the identity. Only the coupled solvers offer it (the decoupled
knapsack keeps at least one unit a group and so never removes a block). It is off by default:
removing a block changes the network's depth, which fine-tuning must recover from, and a
saliency measured on channels says little about how much a whole block is worth; turn it on
where the table shows that depth costs more than width (at tight budgets).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from . import coupled, coupled_dual
from .config import SOLVERS
from .errors import HalpError, InfeasibleBudget, NotCoupled
from .knapsack import solve as solve_knapsack
from .lut.stream_pricing import network_params
from .spec import NetworkSpec

if TYPE_CHECKING:  # only its methods are called: keeps this module free of torch
    from .lut import LatencyTable

#: channels per pruning unit when the LUT does not name its grid step: TensorRT kernels and CPU
#: SIMD process channels in blocks of 8 or 16 (FP16/INT8 tensor cores need multiples of 8), so
#: counts between blocks pay for the padding without the accuracy. By default the unit is the
#: LUT's step (the backend's channel block); override per group with ``unit=``
DEFAULT_UNIT = 8
#: re-solves with a tightened budget before the greedy fallback takes over
MAX_TIGHTEN = 12
#: solves of one step at most where the table prices heavy layers in the working set of the
#: network (:mod:`pipeline.lut.ladders`): today's network's, then a bisection for the least
#: working set whose answer fits in it (:meth:`Planner._settled`)
WORKING_SET_SOLVES = 6
#: a step whose answer keeps this close to today's working set is not solved again: the
#: schedule's small steps (the pruner's) stay one solve each
WORKING_SET_SLACK = 0.1

Scores = Mapping[int, Sequence[float] | np.ndarray]
Kept = Mapping[int, Sequence[int] | np.ndarray]


@dataclass(frozen=True)
class Plan:
    """An architecture the planner chose.

    ``counts`` and ``keep`` (sorted channel indices) per sizable group; ``predicted_ms`` is the
    whole network with every layer at its true (cin, cout); ``value`` the saliency kept.
    A removed block's inner groups keep zero channels (:attr:`removed` names the blocks).
    ``method`` says how the last step got within budget: ``"coupled"`` (the coupled optimum,
    within ``gap`` of it), ``"exact"`` (the first decoupled knapsack solution fitted),
    ``"tightened"`` (after re-solving under a lower budget), ``"greedy"`` (the fallback) or
    ``"unchanged"`` (nothing smaller fits: only a table pricing smaller layers higher gets
    there). ``gap`` is the last coupled step's certified gap (None when decoupled won).
    """

    counts: dict[int, int]
    keep: dict[int, np.ndarray]
    predicted_ms: float
    value: float
    method: str
    gap: float | None = None
    removed: tuple[str, ...] = ()


class Planner:
    """HALP's decisions for ``spec`` priced by ``lut``.

    ``unit`` is channels per pruning unit: an int, or {group id: int} over the default (the
    table's grid step, else 8). Only groups every member layer holds whole are sized
    (:meth:`NetworkSpec.sizable_groups`); :attr:`unsized` names the others, left dense.
    ``block_removal`` lets the coupled solvers remove whole residual blocks (module docstring).
    """

    def __init__(self, spec: NetworkSpec, lut: LatencyTable,
                 unit: int | Mapping[int, int] | None = None, *, block_removal: bool = False):
        lut.check_spec(spec)
        self.spec, self.lut = spec, lut
        self.groups: list[int] = spec.sizable_groups()
        if not self.groups:
            raise HalpError("the network has no channel groups HALP can size (all reach the "
                            "output, are grouped convolutions, are ignored, or are only partly "
                            "held by a concatenation/split); see `halp analyze`")
        self.units = _units(unit, spec, self.groups,
                            default=int(lut.meta.get("step") or DEFAULT_UNIT))
        self._choices = {g: _choices(spec.group(g).channels, u) for g, u in self.units.items()}
        self._charged = {g: [la for la in spec.layers if la.out_group == g] for g in self.groups}
        self._touching = {g: [la for la in spec.layers if la.out_group == g
                              or any(s == g for s, _ in la.in_sources)] for g in self.groups}
        #: the blocks a step may remove: removable, every inner group sized
        self.blocks = [b for b in spec.removable_blocks if set(b.groups) <= set(self.groups)] \
            if block_removal else []
        self._zeroable = {g for b in self.blocks for g in b.groups}
        #: the coupled problem over every grid count with the working set it is priced in,
        #: built on the first coupled step in that working set (or why the network cannot be
        #: priced coupled, in any); each step solves a restriction of it. Only the last one is
        #: kept: a table with ladders prices each step in another working set
        self._coupled_base: tuple[int | None, coupled.Problem] | NotCoupled | None = None
        #: prediction of the dense network
        self.dense_ms = self.predict()
        #: every group at one unit, every block it may remove removed
        self._smallest = {g: 0 if g in self._zeroable else int(c[1])
                          for g, c in self._choices.items()}
        smallest = self.predict(self._smallest)
        #: the smallest feasible target: every group at one unit, every block it may remove
        #: removed (noisy LUTs may price that above the dense network, which then is the minimum)
        self.minimum_ms = min(smallest, self.dense_ms)

    @property
    def choices(self) -> dict[int, np.ndarray]:
        """Channel counts each group may keep; index k = units kept (index 0 is 0 channels)."""
        return {g: c.copy() for g, c in self._choices.items()}

    @property
    def unsized(self) -> dict[int, list[str]]:
        """Prunable groups left dense, with the layers holding only part of their channels
        (``LayerSpec.dims`` cannot price pruning them)."""
        return {g.id: partial for g in self.spec.prunable_groups
                if (partial := self.spec.partial_layers(g.id))}

    def predict(self, counts: Mapping[int, int] | None = None) -> float:
        """Whole-network ms with every layer at its true (cin, cout) under ``counts`` (the
        blocks whose inner groups are all at zero removed)."""
        return self.lut.predict(self._network(counts), counts)

    def _working_set(self, counts: Mapping[int, int]) -> int:
        """The weights of the network ``counts`` leaves, to price its layers in."""
        return network_params(self._network(counts), counts)

    def _network(self, counts: Mapping[int, int] | None) -> NetworkSpec:
        """The spec without the blocks ``counts`` removes."""
        removed = self.spec.removed_blocks(counts) if counts and self.blocks else []
        return self.spec.without(removed) if removed else self.spec

    def check_target(self, target_ms: float) -> float:
        """``target_ms`` as a float, or InfeasibleBudget naming :attr:`minimum_ms`."""
        if not target_ms >= self.minimum_ms:
            minimum, dense = self.minimum_ms, self.dense_ms
            raise InfeasibleBudget(
                f"target {target_ms:.4g} ms is below the fastest network this LUT predicts, "
                f"{minimum:.4g} ms ({minimum / dense:.3f} of the dense {dense:.4g} ms, every "
                "prunable group at one unit): raise the target to at least that, or make more "
                "layers prunable",
                minimum,
            )
        return float(target_ms)

    def schedule(self, target_ms: float, steps: int, *,
                 start_ms: float | None = None) -> list[float]:
        """The paper's exponential budgets ``B_s = L0 · (Lt / L0) ** (s / steps)``, s = 1..steps,
        from ``start_ms`` (default: the dense prediction) to the target, which ends it exactly."""
        positive_int("steps", steps)
        start = self.dense_ms if start_ms is None else start_ms
        return [start * (target_ms / start) ** (s / steps) for s in range(1, steps)] + \
            [float(target_ms)]

    def solve(self, saliency: Scores, budget_ms: float, *, keep: Kept | None = None,
              steps: int = 1, solver: str = "coupled") -> Plan:
        """The architecture ``steps`` knapsack steps on the schedule reach, from ``keep``
        (kept channel indices per group; default: all) down to ``budget_ms``.

        Channels never re-grow: counts stay at most ``len(keep[g])`` and channels outside
        ``keep`` rank last. ``solver`` is one of :data:`SOLVERS`: the decoupled knapsack
        prices every layer at today's input counts and so over-prunes in one big step; the
        coupled ones price the true network in any step.
        """
        check_solver(solver)
        self.check_target(budget_ms)
        kept = {g: np.asarray(keep[g], dtype=np.int64) if keep is not None and g in keep
                else np.arange(self.spec.group(g).channels) for g in self.groups}
        order, gains = self._ranked(saliency, kept)
        counts = {g: len(k) for g, k in kept.items()}
        method, gap = "exact", None
        for budget in self.schedule(budget_ms, steps, start_ms=self.predict(counts)):
            counts, method, gap = self._settled(budget, gains, counts, solver)
        return Plan(counts=counts, keep={g: np.sort(order[g][:c]) for g, c in counts.items()},
                    predicted_ms=self.predict(counts), value=_value(gains, counts),
                    method=method, gap=gap,
                    removed=tuple(b.name for b in self.spec.removed_blocks(counts)))

    def _settled(self, budget: float, gains: Mapping[int, np.ndarray],
                 current: Mapping[int, int], solver: str
                 ) -> tuple[dict[int, int], str, float | None]:
        """One step from ``current`` to ``budget``: (counts, method, gap).

        The knapsack prices every layer in the working set of one network. Where the table
        prices heavy layers by it (ladders, which never fall as the working set grows), an
        answer priced in at least its own network's working set costs no more than priced, and
        one priced in far more over-prunes: a layer whose weights stream from memory in the
        dense network may run from the cache in the chosen one. So the step is solved in
        today's network's working set; where its answer's own is smaller by more than
        ``WORKING_SET_SLACK``, the working set is bisected, in log weights down to the smallest
        network's, for the least in which the chosen network's own fits
        (``WORKING_SET_SOLVES`` solves at most). Of the answers, the most valuable within
        budget by true prediction is kept."""
        if not self.lut.streams:  # every layer priced at its point
            return self._solved(budget, gains, current, solver, None)
        high = self._working_set(current)
        best = self._solved(budget, gains, current, solver, high)
        if self._working_set(best[0]) >= (1 - WORKING_SET_SLACK) * high:
            return best  # a small step: priced in nearly its own working set already
        low = self._working_set(self._smallest)
        for _ in range(WORKING_SET_SOLVES - 1):
            if high <= low:
                break
            middle = math.isqrt(low * high)
            found = self._solved(budget, gains, current, solver, middle)
            if self._beats(found[0], best[0], budget, gains):
                best = found
            if self._working_set(found[0]) <= middle:
                high = middle
            else:
                low = middle + 1
        return best

    def _solved(self, budget: float, gains: Mapping[int, np.ndarray],
                current: Mapping[int, int], solver: str,
                params: int | None) -> tuple[dict[int, int], str, float | None]:
        """The step solved with the layers priced in a network of ``params`` weights: the
        decoupled knapsack's answer, or the coupled one where it is worth more within budget."""
        counts, method = self._step(budget, gains, current, params)
        found = None if solver == "decoupled" else self._coupled(budget, gains, current,
                                                                 solver, params)
        if found is not None and self._beats(found[0], counts, budget, gains):
            return found[0], "coupled", found[1]
        return counts, method, None

    def _coupled(self, budget: float, gains: Mapping[int, np.ndarray],
                 current: Mapping[int, int], solver: str,
                 params: int | None) -> tuple[dict[int, int], float] | None:
        """Counts within ``budget`` by the coupled knapsack (never above ``current``) and the
        certified gap; None when nothing smaller than ``current`` fits, or (``"coupled"``, the
        default) when the network cannot be priced coupled (:class:`NotCoupled`). Layers are
        priced in a network of ``params`` weights (None: at their points)."""
        allowed = {g: self._allowed(g, current[g])[0 if g in self._zeroable else 1:]
                   for g in self.groups}
        try:
            problem = self._coupled_problem(allowed, gains, params)
            result = (coupled.solve_milp if solver == "highs" else coupled_dual.solve)(
                problem, budget)
        except InfeasibleBudget:
            return None
        except NotCoupled:
            if solver == "highs":
                raise
            return None
        counts = {g: int(c[k]) for (g, c), k in zip(allowed.items(), result.keep, strict=True)}
        return counts, result.gap

    def _coupled_problem(self, allowed: Mapping[int, np.ndarray],
                         gains: Mapping[int, np.ndarray], params: int | None) -> coupled.Problem:
        """The coupled problem over the ``allowed`` counts, worth ``gains``, priced in a network
        of ``params`` weights: a restriction of the one built over the whole grid (the table is
        queried once per working set priced in, not once per step), or built afresh where a
        caller's ``keep`` put a count off the grid."""
        values = {g: gains[g][c] for g, c in allowed.items()}
        if not all(np.isin(c, self._choices[g]).all() for g, c in allowed.items()):
            return coupled.network_problem(self.spec, self.lut, allowed, values, self.blocks,
                                           network_params=params)
        grid = {g: c[0 if g in self._zeroable else 1:] for g, c in self._choices.items()}
        if isinstance(self._coupled_base, NotCoupled):
            raise self._coupled_base
        if self._coupled_base is None or self._coupled_base[0] != params:
            try:
                self._coupled_base = params, coupled.network_problem(
                    self.spec, self.lut, grid, {g: np.zeros(len(c)) for g, c in grid.items()},
                    self.blocks, network_params=params)
            except NotCoupled as exc:
                self._coupled_base = exc
                raise
        base = self._coupled_base[1]
        picks = [np.flatnonzero(np.isin(grid[g], allowed[g])) for g in self.groups]
        return replace(base.restricted(picks), values=[values[g] for g in self.groups])

    def _beats(self, candidate: Mapping[int, int], incumbent: Mapping[int, int], budget: float,
               gains: Mapping[int, np.ndarray]) -> bool:
        """Whether ``candidate`` fits ``budget`` by true prediction and ``incumbent`` either does
        not or keeps less saliency."""
        return self.predict(candidate) <= budget and (
            self.predict(incumbent) > budget or _value(gains, candidate) > _value(gains,
                                                                                 incumbent))

    def _allowed(self, g: int, current: int) -> np.ndarray:
        """Group g's counts up to ``current`` (which is one of them), from 0."""
        c = self._choices[g]
        return np.union1d(c[c <= current], [current])

    def _ranked(self, saliency: Scores, kept: Mapping[int, np.ndarray]
                ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Per group: channel order (best first) and gains[c] = saliency of the best c."""
        order, gains = {}, {}
        for g in self.groups:
            channels = self.spec.group(g).channels
            scores = np.asarray(saliency[g], dtype=np.float64) if g in saliency else None
            if scores is None or scores.shape != (channels,):
                got = "none" if scores is None else f"shape {scores.shape}"
                raise HalpError(f"saliency for group {g}: {got}; give one score per channel "
                                f"({channels}) for every group in planner.groups")
            if not np.all(np.isfinite(scores) & (scores >= 0)):
                raise HalpError(f"saliency for group {g} must be finite and >= 0")
            order[g] = _rank(scores, kept[g])
            gains[g] = np.concatenate(([0.0], np.cumsum(scores[order[g]])))
        return order, gains

    def _step(self, budget: float, gains: Mapping[int, np.ndarray],
              current: Mapping[int, int], params: int | None) -> tuple[dict[int, int], str]:
        """Counts within ``budget`` by true prediction, maximising kept saliency, never above
        ``current``, with the layers priced in a network of ``params`` weights; and the method
        that found them (:class:`Plan`)."""
        allowed = {g: self._allowed(g, current[g]) for g in self.groups}
        values = [gains[g][allowed[g]] for g in self.groups]
        present = self._present(current)
        costs = [self._costs(g, allowed[g], current, present, params) for g in self.groups]
        # everything not charged to a group (its layers at today's counts, the constant)
        room = budget - (self.predict(current) - math.fsum(c[-1] for c in costs))
        best = dict(current)
        at_least = [min(1, current[g]) for g in self.groups]  # a removed block stays removed
        for attempt in range(MAX_TIGHTEN):
            try:
                keep = solve_knapsack(values, costs, room, min_keep=at_least).keep
            except InfeasibleBudget:
                break
            counts = {g: int(allowed[g][k]) for g, k in zip(self.groups, keep, strict=True)}
            predicted = self.predict(counts)
            if predicted <= budget:
                return counts, "tightened" if attempt else "exact"
            best = counts
            room -= predicted - budget
        counts = self._greedy(best, budget, gains, params)
        if self.predict(counts) <= budget:
            return counts, "greedy"
        return dict(current), "unchanged"

    def _present(self, counts: Mapping[int, int]) -> set[str]:
        """Names of the layers left once the blocks ``counts`` removes are gone."""
        return {la.name for la in self._network(counts).layers}

    def _costs(self, g: int, allowed: np.ndarray, current: Mapping[int, int],
               present: set[str], params: int | None) -> np.ndarray:
        """Latency of the layers producing group g's channels at each allowed count, with
        their inputs at today's counts (depthwise layers: input = output), in a network of
        ``params`` weights; only layers in ``present`` (:meth:`_present` of ``current``)
        count."""
        costs = np.zeros(len(allowed))
        for i, cout in enumerate(allowed[1:].tolist(), start=1):
            costs[i] = math.fsum(self.lut.latency(la, cout if la.op == "dwconv"
                                                  else la.dims(current)[0], cout, params)
                                 for la in self._charged[g] if la.name in present)
        return costs

    def _greedy(self, counts: dict[int, int], budget: float,
                gains: Mapping[int, np.ndarray], params: int | None) -> dict[int, int]:
        """Drop the unit losing the least saliency per ms saved until the prediction fits.

        The fallback when re-solving does not converge; budgets are at least
        :attr:`minimum_ms` (every group at one unit), so it ends within budget unless the LUT
        prices smaller layers higher. The savings are priced in a network of ``params``
        weights; the prediction that ends it in the network's own.
        """
        counts = dict(counts)
        present = self._present(counts)  # greedy removes no block
        while self.predict(counts) > budget:
            best: tuple[float, float, int, int] | None = None
            for g in self.groups:
                smaller = self._choices[g][self._choices[g] < counts[g]]
                if len(smaller) <= 1:  # only 0 is below: the group is at one unit
                    continue
                trial = {**counts, g: int(smaller[-1])}
                saved = math.fsum(self.lut.latency(la, *la.dims(counts), params)
                                  - self.lut.latency(la, *la.dims(trial), params)
                                  for la in self._touching[g] if la.name in present)
                lost = float(gains[g][counts[g]] - gains[g][trial[g]])
                ratio = lost / saved if saved > 0 else math.inf
                if best is None or (ratio, lost, g) < best[:3]:
                    best = (ratio, lost, g, trial[g])
            if best is None:
                break
            counts[best[2]] = best[3]
        return counts


def check_solver(solver: str) -> str:
    """``solver`` when it is one of :data:`SOLVERS`, else HalpError listing them."""
    if solver not in SOLVERS:
        raise HalpError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}: 'coupled' "
                        "prices every layer at its true (cin, cout) (default), 'decoupled' is "
                        "HALP's knapsack, 'highs' the coupled problem as a MILP (slow reference)")
    return solver


def _value(gains: Mapping[int, np.ndarray], counts: Mapping[int, int]) -> float:
    """Saliency kept by ``counts``."""
    return math.fsum(float(gains[g][c]) for g, c in counts.items())


def positive_int(name: str, value: object) -> int:
    """``value`` when it is a positive int (a bool is not), else HalpError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HalpError(f"{name}={value!r} must be a positive int")
    return value


def _units(unit: int | Mapping[int, int] | None, spec: NetworkSpec, groups: list[int], *,
           default: int) -> dict[int, int]:
    """Channels per unit for each sizable group, clipped to the group size."""
    per = dict(unit) if isinstance(unit, Mapping) else {}
    default = default if unit is None or isinstance(unit, Mapping) else unit
    unknown = sorted(set(per) - set(groups))
    if unknown:
        raise HalpError(f"unit= names groups {unknown} that are not prunable; prunable groups "
                        f"are {groups} (see `halp analyze`)")
    out = {}
    for g in groups:
        u = per.get(g, default)
        if isinstance(u, bool) or not isinstance(u, (int, np.integer)) or u < 1:
            raise HalpError(f"unit for group {g} must be a positive int of channels, got {u!r}")
        out[g] = min(int(u), spec.group(g).channels)
    return out


def _choices(channels: int, unit: int) -> np.ndarray:
    """Channel counts a group may keep, index k = units kept: 0, u, 2u, ..., and the full size
    (a partial last unit only when ``channels`` is not a multiple of ``unit``)."""
    counts = list(range(0, channels + 1, unit))
    if counts[-1] != channels:
        counts.append(channels)
    return np.array(counts, dtype=np.int64)


def _rank(saliency: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Channel indices best first: kept before masked, then by saliency, then by index.

    Masked channels come last so a group never re-grows; the index tie-break makes every
    rank of a distributed run order equal saliencies identically.
    """
    masked = np.ones(len(saliency), dtype=np.int8)
    masked[kept] = 0
    return np.lexsort((np.arange(len(saliency)), -saliency, masked))
