"""The coupled knapsack's fast solver: Lagrangian relaxation of the budget, with a certified gap.

For a rate λ >= 0 and any choice x within budget B, value(x) <= value(x) + λ (B − cost(x)) <=
λ B + max_y (value(y) − λ cost(y)) =: L(λ), and the inner maximum has no budget: variable
elimination over the group graph solves it exactly (:meth:`Problem.relaxed`). L is convex and
piecewise linear in λ; its minimum is found by the breakpoint search of the dual (the rate
through the best choices known over and under the budget, until no choice lies above that
line). The search runs on a coarse copy (a few counts per group, tables a hundredth the size);
L(λ) bounds the full problem at any λ, so one elimination of the full problem at the coarse
rate gives a bound, and its relaxed optimum, brought within budget and improved by local moves
(one group's count changed where it pays and fits), a feasible choice. On real networks the two
are then within :data:`GAP` and the solve ends there (each full elimination of a ResNet-50 at 8
channels a unit is ~20 ms); otherwise the breakpoint search goes on over the full problem from a
bracket of the coarse rate, and the best relaxed optimum within budget and the last one over,
each polished, join the candidates. The result carries min L over the full problem's
eliminations as its bound, so ``(bound − value) / bound`` is a certified gap.
"""

from __future__ import annotations

import numpy as np

from .coupled import Problem, Result, cheapest, infeasible

#: breakpoint search rounds (each one elimination); it ends far sooner on real networks
MAX_ROUNDS = 200
#: choices per group in the coarse problem that brackets the rate before the full one
COARSE = 8
#: relative gap that certifies the relaxed optimum at the coarse rate (the issue asks 0.1%)
GAP = 1e-4
#: rate steps (factor, tries) from the coarse optimum to a bracket of the full one
BRACKET_STEP, BRACKET_TRIES = 1.03, 4


def solve(problem: Problem, budget: float, *, gap: float = GAP) -> Result:
    """A feasible choice within ``budget`` and an upper bound on the optimum (InfeasibleBudget
    when even the fastest network is over); the full search is skipped when the coarse copy's
    rate already certifies a choice within ``gap`` (relative) of its bound."""
    over = problem.top()  # the best ignoring budget
    if problem.cost(over) <= budget:
        value = problem.value(over)
        return Result(over, value, problem.cost(over), value)
    # a coarse copy (every few counts) finds the rate cheaply; its choices are choices of the
    # full problem, but only eliminations of the full problem give valid bounds
    picks = [np.unique(np.r_[0:len(c):-(-len(c) // COARSE), len(c) - 1]) for c in problem.counts]
    coarse = problem.restricted(picks)
    under_c = cheapest(coarse)
    if coarse.cost(under_c) > budget:  # only then is the full problem's fastest needed
        fastest = cheapest(problem)
        if problem.cost(fastest) > budget:
            raise infeasible(problem.cost(fastest), budget)
        picks = [np.union1d(p, f) for p, f in zip(picks, fastest, strict=True)]
        coarse = problem.restricted(picks)
        under_c = cheapest(coarse)
    over_c, under_c, _, _ = _search(coarse, budget, np.array([len(p) - 1 for p in picks]),
                                    under_c)
    over, under = _lift(picks, over_c), _lift(picks, under_c)
    rate = max(0.0, (problem.value(over) - problem.value(under)) / (problem.cost(over)
                                                                    - problem.cost(under)))
    x = problem.relaxed(1.0, rate)
    bound = problem.value(x) - rate * (problem.cost(x) - budget)
    best = polish(problem, x, budget)
    if problem.value(best) < (1 - gap) * bound:  # not certified at the coarse rate
        over, _, full_bound, found = _search(problem, budget,
                                                 *_bracket(problem, budget, rate, x, over, under))
        bound = min(bound, full_bound)
        best = max((best, polish(problem, found, budget), polish(problem, over, budget)),
                   key=problem.value)
    return Result(best, problem.value(best), problem.cost(best), max(bound, problem.value(best)))


def _lift(picks: list[np.ndarray], keep: np.ndarray) -> np.ndarray:
    """A choice of the problem restricted to ``picks`` as indices of the full problem."""
    return np.array([p[k] for p, k in zip(picks, keep, strict=True)])


def _bracket(problem: Problem, budget: float, rate: float, x: np.ndarray, over: np.ndarray,
             under: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relaxed optima of the full problem over and within budget at rates near ``rate`` (the
    coarse problem's optimum, where ``x`` is the relaxed optimum), so the search starts from a
    tight bracket; ``over`` and ``under`` where none is found in a few tries."""
    found = {problem.cost(x) <= budget: x}
    for _ in range(BRACKET_TRIES - 1):
        if len(found) == 2:
            break
        rate *= 1 / BRACKET_STEP if True in found else BRACKET_STEP
        x = problem.relaxed(1.0, rate)
        found.setdefault(problem.cost(x) <= budget, x)
    return found.get(False, over), found.get(True, under)


def _search(problem: Problem, budget: float, over: np.ndarray, under: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """The dual's breakpoint search from a choice over budget and one within it: (the last
    choices over and within budget, min L over the rates tried, the best choice within budget).

    The bound starts at the unconstrained best value (nothing is worth more). When ``under``
    is worth at least ``over`` the line through them says nothing (``over`` need not be a
    relaxed optimum), so the search goes on from the unconstrained best, and stops when even
    that is worth no more than ``under``, which is then optimal.
    """
    top = problem.top()  # the relaxation at λ = 0
    bound, best = problem.value(top), under
    for _ in range(MAX_ROUNDS):
        v_over, c_over = problem.value(over), problem.cost(over)
        v_under, c_under = problem.value(under), problem.cost(under)
        if v_under >= v_over:
            if v_over >= bound:
                break
            over = top
            continue
        rate = (v_over - v_under) / (c_over - c_under)
        x = problem.relaxed(1.0, rate)
        lagrangian = problem.value(x) - rate * problem.cost(x)
        bound = min(bound, lagrangian + rate * budget)
        if lagrangian <= v_over - rate * c_over + 1e-12 * abs(v_over):
            break  # no choice above the line: rate minimises L
        if problem.cost(x) <= budget:
            under = x
            best = x if problem.value(x) > problem.value(best) else best
        else:
            over = x
    return over, under, bound, best


def _moves(problem: Problem, keep: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Group g's value and latency at each of its choices, the other groups fixed at ``keep``."""
    cost = problem.unary[g].copy()
    for (i, j), table in problem.pairs.items():
        if i == g:
            cost += table[:, keep[j]]
        elif j == g:
            cost += table[keep[i], :]
    return problem.values[g], cost


def polish(problem: Problem, keep: np.ndarray, budget: float) -> np.ndarray:
    """``keep`` brought within budget (:func:`repair`), then improved (:func:`improve`)."""
    return improve(problem, repair(problem, keep, budget), budget)


def improve(problem: Problem, keep: np.ndarray, budget: float) -> np.ndarray:
    """Local search within budget: repeatedly take the one-group change gaining the most value
    per ms added (any gain that saves time first) until none fits."""
    keep = keep.copy()
    while True:
        slack = budget - problem.cost(keep)
        best: tuple[float, float] = (0.0, 0.0)
        pick = None
        for g in range(len(keep)):
            value, cost = _moves(problem, keep, g)
            gain, extra = value - value[keep[g]], cost - cost[keep[g]]
            ok = (gain > 0) & (extra <= slack)
            if not ok.any():
                continue
            score = np.where(ok, np.where(extra > 0, gain / np.maximum(extra, 1e-300), np.inf),
                             -np.inf)
            k = int(np.argmax(score))
            if pick is None or (score[k], gain[k]) > best:
                best, pick = (score[k], gain[k]), (g, k)
        if pick is None:
            return keep
        keep[pick[0]] = pick[1]


def repair(problem: Problem, keep: np.ndarray, budget: float) -> np.ndarray:
    """A choice over budget brought within it: repeatedly the one-group change losing the least
    value per ms saved (it ends: the fastest network fits, and every step saves time)."""
    keep = keep.copy()
    while problem.cost(keep) > budget:
        best, pick = np.inf, None
        for g in range(len(keep)):
            value, cost = _moves(problem, keep, g)
            loss, saved = value[keep[g]] - value, cost[keep[g]] - cost
            ok = saved > 0
            if not ok.any():
                continue
            score = np.where(ok, np.maximum(loss, 0) / np.where(ok, saved, 1), np.inf)
            k = int(np.argmin(score))
            if score[k] < best:
                best, pick = score[k], (g, k)
        if pick is None:  # cannot happen with exact costs: the fastest choice fits
            return cheapest(problem)
        keep[pick[0]] = pick[1]
    return keep
