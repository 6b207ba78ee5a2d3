"""The coupled knapsack: its network pricing against the table, its solvers against brute force
and HiGHS."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
from _tables import mac_table
from test_planner import SPEC, _table

from pipeline.coupled import Problem, cheapest, network_problem, solve_milp
from pipeline.coupled_dual import COARSE, GAP, solve
from pipeline.errors import HalpError, InfeasibleBudget
from pipeline.group_graph import Eliminator
from pipeline.lut import LatencyTable
from pipeline.planner import Planner
from pipeline.spec import NetworkSpec


def random_problem(seed: int, groups: int = 4, choices: int = 4) -> Problem:
    """A chain with one triangle (0-1-2) and a tail, costs increasing with counts as tables do."""
    rng = np.random.default_rng(seed)
    counts = [np.arange(1, rng.integers(2, choices + 1) + 1) * 8 for _ in range(groups)]
    values = [np.cumsum(np.sort(rng.random(len(c)))[::-1]) for c in counts]
    unary = [np.sort(rng.random(len(c))) for c in counts]
    edges = [(0, 1), (1, 2), (0, 2)] + [(g - 1, g) for g in range(3, groups)]
    pairs = {e: 0.1 * np.outer(counts[e[0]], counts[e[1]]) / 64 * rng.uniform(0.5, 1.5)
             for e in edges}
    return Problem(counts, values, unary, pairs, constant=0.25)


def brute(problem: Problem, budget: float) -> tuple[float, np.ndarray] | None:
    best = None
    for keep in itertools.product(*(range(len(c)) for c in problem.counts)):
        if problem.cost(keep) <= budget and (best is None or problem.value(keep) > best[0]):
            best = (problem.value(keep), np.array(keep))
    return best


def budgets(problem: Problem, n: int = 6) -> np.ndarray:
    low = problem.cost(cheapest(problem))
    high = problem.cost([len(c) - 1 for c in problem.counts])
    return np.linspace(low, high, n)


def test_network_problem_prices_like_the_table() -> None:
    planner = Planner(SPEC, _table())
    counts = {g: c[1:] for g, c in planner.choices.items()}
    problem = network_problem(SPEC, planner.lut, counts, {g: np.arange(len(c)) * 1.0
                                                         for g, c in counts.items()})
    assert list(problem.pairs) == [(0, 1)]
    for keep in itertools.product(*(range(len(c)) for c in problem.counts)):
        chosen = {g: int(c[k]) for (g, c), k in zip(counts.items(), keep, strict=True)}
        assert problem.cost(keep) == pytest.approx(planner.predict(chosen), rel=1e-12)
    assert problem.cost(cheapest(problem)) == pytest.approx(planner.minimum_ms, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_milp_matches_brute_force(seed: int) -> None:
    problem = random_problem(seed)
    for budget in budgets(problem):
        expected = brute(problem, budget)
        result = solve_milp(problem, budget)
        assert result.cost <= budget + 1e-9
        assert result.value == pytest.approx(expected[0], rel=1e-9)
        assert result.bound >= result.value and result.gap <= 1e-6


def test_cheapest_is_the_fastest_choice() -> None:
    problem = random_problem(7, groups=5)
    costs = [problem.cost(k) for k in itertools.product(*(range(len(c))
                                                         for c in problem.counts))]
    assert problem.cost(cheapest(problem)) == pytest.approx(min(costs), rel=1e-12)


@pytest.mark.parametrize(("solver", "seed", "below"), [(solve_milp, 1, 0.99), (solve, 2, 0.5)])
def test_solvers_name_the_minimum_when_nothing_fits(solver, seed: int, below: float) -> None:
    problem = random_problem(seed)
    minimum = problem.cost(cheapest(problem))
    with pytest.raises(InfeasibleBudget) as info:
        solver(problem, below * minimum)
    assert math.isclose(info.value.minimum, minimum)


@pytest.mark.parametrize("seed", range(8))
def test_fast_solver_is_feasible_and_its_bound_holds(seed: int) -> None:
    """Against brute force: within budget, never above the optimum, and the optimum never
    above its bound (so the certified gap is true)."""
    problem = random_problem(seed, groups=5)
    for budget in budgets(problem, 8):
        optimum = brute(problem, budget)[0]
        result = solve(problem, budget)
        assert result.cost <= budget
        assert result.value == pytest.approx(problem.value(result.keep), rel=1e-12)
        assert result.value <= optimum + 1e-9 <= result.bound + 2e-9
        assert 0 <= result.gap < 1


@pytest.mark.parametrize("seed", range(6))
def test_fast_solver_bound_holds_with_many_counts(seed: int) -> None:
    """Groups with more counts than the coarse copy keeps, budgets down to the fastest network:
    HiGHS's optimum within the bound whether the coarse rate certifies the answer (any gap
    accepted), the full search runs (none accepted), or the default decides."""
    problem = random_problem(seed, groups=6, choices=24)
    for budget in budgets(problem, 7):
        exact = solve_milp(problem, budget)
        for gap in (1.0, 0.0, GAP):
            fast = solve(problem, budget, gap=gap)
            assert fast.cost <= budget
            assert exact.value <= fast.bound * (1 + 1e-9)
            assert fast.value <= exact.bound * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_fast_solver_finds_a_fastest_network_off_the_coarse_grid(seed: int) -> None:
    """Latency dips at a count the coarse copy skips (tables are not monotone): at budgets
    only such networks meet, the solver still answers, within HiGHS's bound, and below them
    names the true minimum."""
    problem = random_problem(seed, groups=6, choices=24)
    dipped = [g for g, unary in enumerate(problem.unary) if len(unary) > COARSE]
    for g in dipped:  # all but the second count slower: the coarse copy keeps every other one
        problem.unary[g][np.arange(len(problem.unary[g])) != 1] += 1e3
    fastest = cheapest(problem)
    assert dipped and all(fastest[g] == 1 for g in dipped)
    minimum = problem.cost(fastest)
    for budget in (minimum, minimum * 1.01):
        fast, exact = solve(problem, budget), solve_milp(problem, budget)
        assert fast.cost <= budget
        assert exact.value <= fast.bound * (1 + 1e-9)
    with pytest.raises(InfeasibleBudget) as info:
        solve(problem, 0.999 * minimum)
    assert math.isclose(info.value.minimum, minimum)


@functools.cache
def resnet18_table() -> tuple[NetworkSpec, LatencyTable]:
    """torchvision's resnet18 as analyze() sees it, with a MAC-priced LatencyTable."""
    import torch
    import torchvision

    from pipeline.structure import analyze

    torch.manual_seed(0)
    spec = analyze(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32),
                   name="resnet18")
    return spec, mac_table(spec)


@pytest.mark.parametrize("seed", range(3))
def test_fast_solver_matches_highs_on_a_real_network(seed: int) -> None:
    spec, table = resnet18_table()
    planner = Planner(spec, table, unit=16)
    rng = np.random.default_rng(seed)
    counts = {g: c[1:] for g, c in planner.choices.items()}
    values = {}
    for g, c in counts.items():
        scores = np.sort(np.abs(rng.standard_normal(spec.group(g).channels)))[::-1]
        values[g] = np.cumsum(scores * rng.uniform(0.2, 5))[c - 1]
    problem = network_problem(spec, table, counts, values)
    for fraction in (0.8, 0.4, 0.1):
        budget = planner.minimum_ms + fraction * (planner.dense_ms - planner.minimum_ms)
        fast, exact = solve(problem, budget), solve_milp(problem, budget)
        assert fast.cost <= budget and exact.cost <= budget
        assert fast.value <= exact.bound * (1 + 1e-9)
        assert exact.value <= fast.bound * (1 + 1e-9)
        assert fast.gap <= 1e-2


@pytest.mark.parametrize("seed", range(4))
def test_elimination_matches_brute_force_on_a_dense_graph(seed: int) -> None:
    """Five variables, every pair but one coupled: steps add tables of several scopes (pairs,
    the tables earlier steps left) before maximising."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 6, size=5).tolist()
    edges = [(i, j) for i in range(5) for j in range(i + 1, 5) if (i, j) != (0, 4)]
    unary = [rng.standard_normal(n) for n in sizes]
    pairs = [rng.standard_normal((sizes[i], sizes[j])) for i, j in edges]

    def total(keep: tuple[int, ...]) -> float:
        return sum(u[k] for u, k in zip(unary, keep, strict=True)) + sum(
            t[keep[i], keep[j]] for (i, j), t in zip(edges, pairs, strict=True))

    best = max(itertools.product(*map(range, sizes)), key=total)
    keep = Eliminator(sizes, edges).maximise(unary, pairs)
    assert total(tuple(keep)) == pytest.approx(total(best), rel=1e-12)


def test_a_densely_coupled_graph_is_refused_with_the_way_out() -> None:
    clique = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    with pytest.raises(HalpError, match="solver='decoupled'"):
        Eliminator([100] * 4, clique)
    assert len(Eliminator([10] * 4, clique).steps) == 4


def block_problem(seed: int) -> Problem:
    """:func:`random_problem` whose groups 1 and 2 form a removable block: each may also keep
    0 channels, worth nothing and costing nothing, but only both at once."""
    problem = random_problem(seed, groups=5)
    counts, values, unary = list(problem.counts), list(problem.values), list(problem.unary)
    for g in (1, 2):
        counts[g], values[g], unary[g] = (np.r_[0, counts[g]], np.r_[0.0, values[g]],
                                          np.r_[0.0, unary[g] * 20])
    pairs = {}
    for (i, j), table in problem.pairs.items():
        table = np.pad(table, ((int(i in (1, 2)), 0), (int(j in (1, 2)), 0)))
        if (i, j) == (1, 2):
            table[0, 1:] = table[1:, 0] = np.inf
        pairs[(i, j)] = table
    return Problem(counts, values, unary, pairs, problem.constant)


@pytest.mark.parametrize("seed", range(4))
def test_solvers_remove_a_block_exactly(seed: int) -> None:
    """Zero-unit choices allowed only jointly: HiGHS equals brute force, the fast solver is
    feasible within its certified bound, and at tight budgets the optimum removes the block."""
    problem = block_problem(seed)
    removed = 0
    for budget in budgets(problem, 8):
        optimum, keep = brute(problem, budget)
        exact, fast = solve_milp(problem, budget), solve(problem, budget)
        assert exact.value == pytest.approx(optimum, rel=1e-9)
        assert fast.cost <= budget and exact.cost <= budget
        assert fast.value <= optimum + 1e-9 <= fast.bound + 2e-9
        assert (fast.keep[1] == 0) == (fast.keep[2] == 0)
        removed += keep[1] == 0
    assert removed and cheapest(problem)[1] == cheapest(problem)[2] == 0


def test_zero_counts_outside_a_block_are_refused() -> None:
    spec, table = resnet18_table()
    counts = {g: np.arange(0, spec.group(g).channels + 1, 16) for g in spec.sizable_groups()}
    with pytest.raises(HalpError, match="only a removed block's groups"):
        network_problem(spec, table, counts, {g: c * 1.0 for g, c in counts.items()})


@pytest.mark.parametrize("seed", range(2))
def test_planner_removes_blocks_where_the_table_makes_it_optimal(seed: int) -> None:
    """resnet18 priced by MAC-like entries: at a budget below what width alone reaches, the
    planner removes a block; its prediction leaves out the block's layers, and the fast solver
    and HiGHS agree within the certified gap."""
    spec, table = resnet18_table()
    planner = Planner(spec, table, unit=16, block_removal=True)
    narrow = Planner(spec, table, unit=16)
    assert planner.minimum_ms < narrow.minimum_ms
    rng = np.random.default_rng(seed)
    saliency = {g: np.abs(rng.standard_normal(spec.group(g).channels)) for g in planner.groups}
    budget = 0.5 * (planner.minimum_ms + narrow.minimum_ms)
    plans = {s: planner.solve(saliency, budget, solver=s) for s in ("coupled", "highs")}
    for plan in plans.values():
        assert plan.removed and plan.predicted_ms <= budget
        gone = [b for b in spec.blocks if b.name in plan.removed]
        assert all(plan.counts[g] == 0 and not len(plan.keep[g]) for b in gone for g in b.groups)
        assert plan.predicted_ms == pytest.approx(
            table.predict(spec.without(gone), plan.counts), rel=1e-12)
    fast, exact = plans["coupled"], plans["highs"]
    assert fast.value <= exact.value * (1 + 1e-9)
    assert exact.value <= fast.value / (1 - fast.gap) * (1 + 1e-9)
    with pytest.raises(InfeasibleBudget):
        narrow.solve(saliency, budget)
