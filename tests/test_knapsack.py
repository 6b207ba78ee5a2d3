"""The knapsack solver against brute force and a plain full-capacity DP."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.errors import HalpError, InfeasibleBudget
from pipeline.knapsack import DEFAULT_CELLS_PER_GROUP, solve, solve_units


def brute(values, costs, budget, lows):
    """(best value, cheapest cost among the best) by enumeration, or None if nothing fits."""
    best = None
    for ks in itertools.product(*[range(lo, len(v)) for v, lo in zip(values, lows, strict=True)]):
        cost = math.fsum(c[k] for c, k in zip(costs, ks, strict=True))
        if cost <= budget:
            value = math.fsum(v[k] for v, k in zip(values, ks, strict=True))
            if best is None or (value, -cost) > (best[0], -best[1]):
                best = (value, cost)
    return best


def cheapest(costs, lows):
    return math.fsum(c[lo:].min() for c, lo in zip(costs, lows, strict=True))


@st.composite
def instances(draw, integer_costs: bool):
    """Small groups with cumulative values and arbitrary (negative, non-monotone) costs."""
    n_groups = draw(st.integers(1, 4))
    values, costs, lows = [], [], []
    for _ in range(n_groups):
        units = draw(st.integers(0, 5))
        gains = draw(st.lists(st.integers(0, 6), min_size=units, max_size=units))
        values.append(np.concatenate(([0.0], np.cumsum(gains, dtype=float))))
        cost = (st.integers(-10, 10).map(float) if integer_costs
                else st.floats(-5, 5, allow_nan=False, allow_subnormal=False))
        costs.append(np.array(draw(st.lists(cost, min_size=units + 1, max_size=units + 1))))
        lows.append(draw(st.integers(0, units)))
    minimum = cheapest(costs, lows)
    budget = minimum + (draw(st.integers(-3, 30)) if integer_costs
                        else draw(st.floats(-1, 15, allow_nan=False)))
    return values, costs, budget, np.array(lows)


def check_solution(sol, values, costs, budget, lows):
    assert len(sol.keep) == len(values)
    assert (sol.keep >= lows).all()
    assert all(k < len(v) for k, v in zip(sol.keep, values, strict=True))
    assert sol.cost == math.fsum(c[k] for c, k in zip(costs, sol.keep, strict=True))
    assert sol.value == math.fsum(v[k] for v, k in zip(values, sol.keep, strict=True))
    assert sol.cost <= budget


@settings(max_examples=300, deadline=None)
@given(instances(integer_costs=True))
def test_integer_costs_match_brute_force(inst):
    """Integer costs at resolution 1 are not rounded at all: exactly the optimum, cheapest."""
    values, costs, budget, lows = inst
    expected = brute(values, costs, budget, lows)
    if expected is None:
        with pytest.raises(InfeasibleBudget) as err:
            solve(values, costs, budget, min_keep=lows, resolution=1.0)
        assert err.value.minimum == cheapest(costs, lows)
        return
    sol = solve(values, costs, budget, min_keep=lows, resolution=1.0)
    check_solution(sol, values, costs, budget, lows)
    assert (sol.value, sol.cost) == expected


@settings(max_examples=300, deadline=None)
@given(instances(integer_costs=False))
@example(([np.array([0.0, 0.0, 1.0])], [np.array([0.0, 0.0, 1.0])], 5e-324, np.array([0])))
def test_float_costs_within_the_documented_bound(inst):
    """Default resolution: never over budget, never worse than the optimum at B - G*res."""
    values, costs, budget, lows = inst
    minimum = cheapest(costs, lows)
    if budget < minimum:
        with pytest.raises(InfeasibleBudget):
            solve(values, costs, budget, min_keep=lows)
        return
    sol = solve(values, costs, budget, min_keep=lows)
    check_solution(sol, values, costs, budget, lows)
    span = budget - minimum
    step = span / (DEFAULT_CELLS_PER_GROUP * len(values)) if span > 0 else 1.0
    margin = len(values) * step * (1 + 1e-9) + 1e-12  # float rounding of the shifted costs
    worse = brute(values, costs, budget - margin, lows)
    assert sol.value <= brute(values, costs, budget, lows)[0]
    assert worse is None or sol.value >= worse[0]


def full_dp(values, costs, capacity):
    """Reference: plain DP over every capacity cell (costs: integers >= 0 for k >= 1)."""
    best = np.full(capacity + 1, -np.inf)
    best[0] = 0.0
    for v, c in zip(values, costs, strict=True):
        new = np.full(capacity + 1, -np.inf)
        for k in range(1, len(v)):
            w = int(c[k])
            if w <= capacity:
                new[w:] = np.maximum(new[w:], best[:capacity + 1 - w] + v[k])
        best = new
    return best.max()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 12), st.sampled_from([0.2, 0.5, 0.8]))
def test_medium_instances_match_full_dp(seed, n_groups, fraction):
    """Many groups and choices (staircase, negative steps, ties): pruning does real work."""
    rng = np.random.default_rng(seed)
    values, costs = [], []
    for _ in range(n_groups):
        units = int(rng.integers(1, 40))
        gains = np.sort(rng.exponential(size=units))[::-1] * rng.lognormal()
        if rng.random() < 0.3:  # plateaus and ties
            gains = np.round(gains)
        values.append(np.concatenate(([0.0], np.cumsum(gains))))
        kind = rng.integers(3)
        steps = (rng.integers(0, 30, size=units), rng.integers(-10, 30, size=units),
                 np.repeat(rng.integers(0, 60, size=units // 4 + 1), 4)[:units])[kind]
        costs.append(np.concatenate(([0.0], np.cumsum(steps))).astype(float))
    floor = sum(c[1:].min() for c in costs)
    budget = floor + fraction * (sum(c[1:].max() for c in costs) - floor)
    sol = solve(values, costs, budget, resolution=1.0)
    check_solution(sol, values, costs, budget, np.ones(n_groups, dtype=int))
    shifted = [c - c[1:].min() for c in costs]
    assert sol.value == pytest.approx(full_dp(values, shifted, math.floor(budget - floor)),
                                      rel=1e-12)


def test_negative_and_nonmonotone_costs():
    values = [np.array([0.0, 5, 6, 9]), np.array([0.0, 1, 4])]
    costs = [np.array([0.0, -2, 3, 1]), np.array([0.0, 4, -1])]
    sol = solve(values, costs, 0.0, min_keep=0, resolution=1.0)
    assert sol.keep.tolist() == [3, 2] and sol.value == 13 and sol.cost == 0
    sol = solve(values, costs, -2.0, min_keep=0, resolution=1.0)
    assert sol.keep.tolist() == [1, 2] and sol.value == 9 and sol.cost == -3


def test_rounding_never_exceeds_the_budget():
    """0.1 + 0.2 > 0.3 in floats: both cannot be kept, however the shift rounds."""
    values = [np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([0.0, 5.0])]
    costs = [np.array([0.0, 0.1]), np.array([0.0, 0.2]), np.array([0.0, 10.0])]
    for resolution in (None, 0.1, 0.05, 1e-3, 0.1 / 3):
        sol = solve(values, costs, 0.3, min_keep=0, resolution=resolution)
        assert sol.cost <= 0.3 and sol.value == 1.0


def test_unconstrained_budget_takes_every_groups_best_cheapest():
    values = [np.array([0.0, 2, 2, 3, 3]), np.array([0.0, 1])]
    costs = [np.array([0.0, 1, 2, 5, 4]), np.array([0.0, -1])]
    sol = solve(values, costs, math.inf)
    assert sol.keep.tolist() == [4, 1] and sol.cost == 3.0 and sol.value == 4.0


def test_min_keep_defaults_to_one_and_zero_allows_emptying():
    values = [np.array([0.0, 1, 2]), np.array([0.0, 10, 20])]
    costs = [np.array([0.0, 5, 6]), np.array([0.0, 5, 6])]
    assert solve(values, costs, 11.0).keep.tolist() == [1, 2]
    assert solve(values, costs, 6.0, min_keep=0).keep.tolist() == [0, 2]
    assert solve(values, costs, 12.0, min_keep=[2, 2]).keep.tolist() == [2, 2]
    with pytest.raises(InfeasibleBudget) as err:
        solve(values, costs, 9.0)
    assert err.value.minimum == 10.0


def test_solve_units_is_the_cumulative_view():
    rng = np.random.default_rng(3)
    sal = [np.sort(rng.random(n))[::-1] for n in (4, 7, 2)]
    delta = [rng.normal(1.0, 0.8, size=len(s)) for s in sal]
    values = [np.concatenate(([0.0], np.cumsum(s))) for s in sal]
    costs = [np.concatenate(([0.0], np.cumsum(d))) for d in delta]
    lowest = sum(np.cumsum(d).min() for d in delta)
    for budget in (lowest + 0.5, lowest + 2.0, lowest + 5.0):
        ours = solve_units(sal, delta, budget + 1.5, base_cost=1.5, resolution=1e-4)
        ref = solve(values, costs, budget, resolution=1e-4)
        assert ours.keep.tolist() == ref.keep.tolist()
        assert ours.cost == pytest.approx(ref.cost + 1.5)
        assert ours.value == pytest.approx(ref.value)
    with pytest.raises(InfeasibleBudget) as err:
        solve_units(sal, delta, 1.0, base_cost=1.5, min_keep=0)
    assert err.value.minimum == pytest.approx(1.5 + sum(min(0.0, np.cumsum(d).min())
                                                        for d in delta))


GOOD_V, GOOD_C = [np.array([0.0, 1.0])], [np.array([0.0, 1.0])]


@pytest.mark.parametrize(("values", "costs", "kwargs", "match"), [
    ([], [], {}, "no groups"),
    (GOOD_V, GOOD_C * 2, {}, "1 value arrays but 2 cost arrays"),
    ([np.array([0.0, 1, 2])], GOOD_C, {}, "3 values but 2 costs"),
    ([np.array([])], [np.array([])], {}, r"values\[0\] is empty"),
    ([np.zeros((2, 2))], GOOD_C, {}, "1-D"),
    ([np.array([0.0, np.nan])], GOOD_C, {}, "NaN or infinity"),
    (GOOD_V, [np.array([0.0, np.inf])], {}, "NaN or infinity"),
    ([np.array([1.0, 2.0])], GOOD_C, {}, r"values\[0\]\[0\] is 1"),
    ([np.array([0.0, 2.0, 1.0])], [np.zeros(3)], {}, "decrease at k=2"),
    (GOOD_V, GOOD_C, {"min_keep": 2}, "min_keep=2 but the group has 1 units"),
    (GOOD_V, GOOD_C, {"min_keep": [1, 1]}, "one per group"),
    (GOOD_V, GOOD_C, {"min_keep": 0.5}, "one per group"),
    (GOOD_V, GOOD_C, {"resolution": 0.0}, "resolution must be a positive"),
    (GOOD_V, GOOD_C, {"resolution": math.nan}, "resolution must be a positive"),
])
def test_bad_input_is_rejected_clearly(values, costs, kwargs, match):
    with pytest.raises(HalpError, match=match):
        solve(values, costs, 0.5, **kwargs)


def test_bad_budget_and_units_are_rejected_clearly():
    with pytest.raises(HalpError, match="NaN"):
        solve(GOOD_V, GOOD_C, math.nan)
    values = [np.array([0.0, 1.0]), np.array([0.0, 1.0])]
    with pytest.raises(HalpError, match="capacity cells"):
        solve(values, [np.array([0.0, 1.0])] * 2, 1.0, min_keep=0, resolution=1e-12)
    with pytest.raises(HalpError, match="2 groups of saliencies but 1"):
        solve_units([[1.0], [1.0]], [[1.0]], 1.0)
    with pytest.raises(HalpError, match="2 unit saliencies but 1 latency"):
        solve_units([[1.0, 0.5]], [[1.0]], 1.0)
    with pytest.raises(HalpError, match="base_cost must be a finite"):
        solve_units([[1.0]], [[1.0]], 1.0, base_cost=math.nan)
    with pytest.raises(HalpError, match="saliencies must be >= 0"):
        solve_units([[1.0, -0.5]], [[1.0, 1.0]], 1.0)
