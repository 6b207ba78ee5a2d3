"""Benchmark: the coupled knapsack (every layer at its true (cin, cout)) against HALP's.

For each ``--lut MODEL=PATH`` (a table built for torchvision's MODEL with 10 classes at the
table's own input shape), the spec comes from ``analyze()`` and saliencies are Taylor-like:
seeded |N(0, 1)| per channel times a log-normal scale per group (groups differ in importance by
an order of magnitude, channels within one far less). At each budget (a fraction of the dense
prediction) four answers, each with its value (saliency kept, also as a share of all of it),
its true prediction (every layer at its real (cin, cout)), the share of the budget it uses and
its solve time:

- ``decoupled``: HALP's knapsack in one step (inputs at dense counts, then tightened);
- ``iterated``: the same over ``--steps`` steps of the exponential schedule (the pruner's way);
- ``coupled``: :func:`pipeline.coupled_dual.solve` with its certified gap (time: the solve
  alone; building the problem from the table is reported once per model);
- ``highs``: :func:`pipeline.coupled.solve_milp` (HiGHS), stopped at ``--milp-time-limit``
  (then ``gap`` is HiGHS's own).

With ``--remove-blocks`` the coupled problem also offers to remove each removable residual
block (:class:`~pipeline.planner.Planner` ``block_removal``); ``blocks`` counts those removed
(the decoupled knapsack never removes one).

Nothing is measured on a runtime: only the tables given are read.

Usage: .venv/bin/python tools/bench_coupled.py --lut resnet50=PATH [--lut mobilenet_v2=PATH]
       [--budgets 0.9 0.7 0.5 0.3 0.1] [--steps 10] [--seed 0] [--milp-time-limit 30]
       [--unit N] [--remove-blocks]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from pipeline.coupled import Problem, network_problem, solve_milp
from pipeline.coupled_dual import solve
from pipeline.errors import InfeasibleBudget
from pipeline.lut import LatencyTable
from pipeline.planner import Planner

T = TypeVar("T")
COLUMNS = ("budget", "method", "value", "value %", "predicted ms", "budget used %", "time ms",
           "gap %", "blocks")


def saliency(planner: Planner, seed: int) -> dict[int, np.ndarray]:
    """Taylor-like scores: |N(0, 1)| per channel, times exp(N(0, 1)) per group."""
    rng = np.random.default_rng(seed)
    return {g: np.abs(rng.standard_normal(planner.spec.group(g).channels)) * np.exp(
        rng.standard_normal()) for g in planner.groups}


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, T]:
    """(milliseconds, result) of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return 1e3 * (time.perf_counter() - start), out


def coupled_problem(planner: Planner, scores: dict[int, np.ndarray]) -> Problem:
    """The coupled problem from dense, as the planner's first step builds it (zero counts only
    for the inner groups of the blocks it may remove)."""
    zeroable = {g for b in planner.blocks for g in b.groups}
    counts = {g: c if g in zeroable else c[1:] for g, c in planner.choices.items()}
    gains = {g: np.concatenate(([0.0], np.cumsum(np.sort(scores[g])[::-1]))) for g in counts}
    return network_problem(planner.spec, planner.lut, counts,
                           {g: gains[g][c] for g, c in counts.items()}, planner.blocks)


def removed(planner: Planner, problem: Problem, keep: np.ndarray) -> int:
    """Blocks the choice ``keep`` (indices of ``problem``) removes."""
    counts = {g: int(c[k]) for g, c, k in zip(planner.groups, problem.counts, keep, strict=True)}
    return len(planner.spec.removed_blocks(counts)) if planner.blocks else 0


def bench_model(name: str, path: str, budgets: list[float], steps: int, seed: int,
                milp_limit: float | None, unit: int | None, remove_blocks: bool) -> None:
    import torch

    from pipeline.models import load_model
    from pipeline.structure import analyze

    lut = LatencyTable.load(path)
    shape = tuple(lut.meta.get("input_shape") or (1, 3, 224, 224))
    spec = analyze(load_model(name, num_classes=10), torch.randn(*shape), name=name)
    planner = Planner(spec, lut, unit, block_removal=remove_blocks)
    scores = saliency(planner, seed)
    total = sum(float(s.sum()) for s in scores.values())
    build_ms, problem = timed(coupled_problem, planner, scores)
    print(f"\n{name} @ {'x'.join(map(str, shape))}: {len(planner.groups)} groups, unit "
          f"{sorted(set(planner.units.values()))}, dense {planner.dense_ms:.4g} ms, fastest "
          f"{planner.minimum_ms:.4g} ms; coupled problem built from the table in "
          f"{build_ms:.0f} ms ({len(problem.pairs)} coupled group pairs); blocks it may remove: "
          f"{len(planner.blocks)}")
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for fraction in budgets:
        budget = fraction * planner.dense_ms
        rows = []
        try:
            planner.check_target(budget)
        except InfeasibleBudget as exc:
            print(f"| {fraction} | all | below the fastest network ({exc.minimum:.4g} ms) |")
            continue
        for method, solver_steps in (("decoupled", 1), ("iterated", steps)):
            ms, plan = timed(planner.solve, scores, budget, steps=solver_steps,
                             solver="decoupled")
            rows.append((method, plan.value, plan.predicted_ms, ms, None, len(plan.removed)))
        ms, fast = timed(solve, problem, budget)
        rows.append(("coupled", fast.value, fast.cost, ms, fast.gap,
                     removed(planner, problem, fast.keep)))
        ms, exact = timed(solve_milp, problem, budget, time_limit=milp_limit)
        rows.append(("highs", exact.value, exact.cost, ms, exact.gap,
                     removed(planner, problem, exact.keep)))
        for method, value, predicted, ms, gap, blocks in rows:
            print(f"| {fraction} | {method} | {value:.2f} | {100 * value / total:.2f} | "
                  f"{predicted:.4g} | {100 * predicted / budget:.1f} | {ms:.1f} | "
                  f"{'' if gap is None else f'{100 * gap:.4f}'} | {blocks} |", flush=True)
        fast_ms, milp_ms = rows[2][3], rows[3][3]
        print(f"|  | coupled vs highs | {rows[2][1] - rows[3][1]:+.3f} | | | | "
              f"{milp_ms / fast_ms:.0f}x faster | | |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lut", action="append", required=True, metavar="MODEL=PATH",
                        help="a table built for torchvision's MODEL (repeat per model)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3, 0.1],
                        help="budgets as fractions of the dense prediction")
    parser.add_argument("--steps", type=int, default=10,
                        help="steps of the iterated decoupled knapsack (halp prune's default)")
    parser.add_argument("--seed", type=int, default=0, help="saliency seed")
    parser.add_argument("--unit", type=int, default=None,
                        help="channels per pruning unit (default: the table's step)")
    parser.add_argument("--milp-time-limit", type=float, default=30.0,
                        help="seconds HiGHS may take per instance (0: no limit)")
    parser.add_argument("--remove-blocks", action="store_true",
                        help="let the coupled solvers remove whole residual blocks")
    args = parser.parse_args(argv)
    for item in args.lut:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--lut {item!r}: give MODEL=PATH")
        bench_model(name, path, args.budgets, args.steps, args.seed,
                    args.milp_time_limit or None, args.unit, args.remove_blocks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
