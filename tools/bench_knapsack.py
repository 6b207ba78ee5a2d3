"""Benchmark: pipeline.knapsack against the HALP paper's item-by-item knapsack DP.

The baseline is written here from the paper's description, independently of the solver: every
channel unit is one item (integer-scaled latency delta as weight, integer-scaled saliency as
value), items come group by group with the most important unit first, a 0/1 table over integer
capacity 0..C is filled item by item in pure Python, a unit may enter at capacity w only if the
previous unit of its group was kept at w - weight, and the kept set is read back from an
items x capacity keep-table. Both solvers keep at least one unit per group (the baseline by
taking every group's first unit up front).

Instances: a ResNet-50-sized one from a real ``analyze()`` of torchvision's resnet50 (unit 8,
prunable groups) whose costs are a FLOPs-derived STAND-IN for a latency table, and random
instances of growing size. When the baseline would need more than ``--max-cells`` table updates
at our default resolution, both are run at a coarser common resolution and ours is also
reported at its default.

Usage: .venv/bin/python tools/bench_knapsack.py [--quick] [--max-cells N] [--repeats N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.knapsack import DEFAULT_CELLS_PER_GROUP, Solution, solve_units

#: assumed throughput turning MACs into the stand-in latency (1 GMAC per ms: ~4 ms for resnet50)
MACS_PER_MS = 1e9


@dataclass(frozen=True)
class Instance:
    """The paper's view: per group, unit saliencies best first and their latency deltas (ms)."""

    name: str
    saliency: list[np.ndarray]
    delta: list[np.ndarray]
    base: float  # latency no group owns
    budget: float

    @property
    def units(self) -> int:
        return sum(len(s) for s in self.saliency)

    def value(self, keep: list[int]) -> float:
        return math.fsum(float(s[:k].sum()) for s, k in zip(self.saliency, keep, strict=True))

    def cost(self, keep: list[int]) -> float:
        return self.base + math.fsum(float(d[:k].sum()) for d, k in zip(self.delta, keep,
                                                                       strict=True))

    def span(self) -> float:
        """Budget left after every group's mandatory first unit (deltas are positive here)."""
        return self.budget - self.cost([1] * len(self.delta))


def sorted_saliency(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    return np.sort(rng.lognormal(size=n))[::-1] * scale


def resnet50_instance(unit: int = 8, seed: int = 0, budget_fraction: float = 0.5) -> Instance:
    """ResNet-50's real channel groups with a FLOPs-derived latency stand-in (not measured).

    Group g keeping k units costs Σ MACs of the layers whose output channels are g, at k*unit
    output channels and their current (dense) input count, divided by MACS_PER_MS.
    """
    import torch
    import torchvision

    from pipeline.structure import analyze

    spec = analyze(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))
    rng = np.random.default_rng(seed)
    groups = spec.prunable_groups
    owned = {g.id for g in groups}
    saliency, delta = [], []
    for group in groups:
        layers = [lay for lay in spec.layers if lay.out_group == group.id]
        k = np.arange(group.channels // unit + 1)
        macs = sum(np.array([lay.macs_at(lay.dims()[0], int(n) * unit) for n in k])
                   for lay in layers)
        delta.append(np.diff(macs) / MACS_PER_MS)
        saliency.append(sorted_saliency(rng, len(k) - 1, rng.lognormal()))
    base = sum(lay.macs_at(*lay.dims()) for lay in spec.layers
               if lay.out_group not in owned) / MACS_PER_MS
    dense = base + sum(float(d.sum()) for d in delta)
    return Instance(f"resnet50 (unit {unit}, FLOPs stand-in)", saliency, delta, base,
                    budget_fraction * dense)


def random_instance(groups: int, seed: int, budget_fraction: float = 0.5) -> Instance:
    """Random groups of 8..64 units; positive, non-uniform latency deltas."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(8, 65, size=groups)
    saliency = [sorted_saliency(rng, int(n), rng.lognormal()) for n in sizes]
    delta = [rng.lognormal() * rng.uniform(0.5, 1.5, size=int(n)) / 100 for n in sizes]
    dense = float(sum(d.sum() for d in delta))
    return Instance(f"random {groups} groups", saliency, delta, 0.0, budget_fraction * dense)


def paper_table(weights: list[list[int]], values: list[list[int]], capacity: int) -> list[int]:
    """The paper's DP: returns how many of each group's units were put in the bag."""
    best = [0] * (capacity + 1)
    keep: list[bytearray] = []
    items: list[tuple[int, int, int]] = []
    for g, (ws, vs) in enumerate(zip(weights, values, strict=True)):
        for j, (w, v) in enumerate(zip(ws, vs, strict=True)):
            row = bytearray(capacity + 1)
            prev = keep[-1] if j > 0 else None
            for c in range(capacity, w - 1, -1):
                if prev is not None and not prev[c - w]:
                    continue
                if best[c - w] + v > best[c]:
                    best[c] = best[c - w] + v
                    row[c] = 1
            keep.append(row)
            items.append((g, j, w))
    taken = [0] * len(weights)
    c = capacity
    for i in range(len(items) - 1, -1, -1):
        g, j, w = items[i]
        if keep[i][c]:
            taken[g] = max(taken[g], j + 1)
            c -= w
    return taken


def paper_solve(inst: Instance, resolution: float) -> list[int]:
    """Scale to integers (weights rounded up, so the true cost stays in budget) and run the DP.

    Every group's first unit is taken up front; the DP places the remaining units.
    """
    top = max(float(s.max()) for s in inst.saliency)
    weights = [[math.ceil(x / resolution) for x in d[1:].tolist()] for d in inst.delta]
    values = [[round(x * 1e6 / top) for x in s[1:].tolist()] for s in inst.saliency]
    extra = paper_table(weights, values, math.floor(inst.span() / resolution))
    return [1 + e for e in extra]


def ours_solve(inst: Instance, resolution: float | None) -> Solution:
    return solve_units(inst.saliency, inst.delta, inst.budget, base_cost=inst.base,
                       resolution=resolution)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time in seconds over ``repeats`` runs, and the last result."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def compare(inst: Instance, max_cells: int, repeats: int) -> dict[str, object]:
    """One row: the baseline and ours at a common resolution, and ours at its default."""
    default_cells = DEFAULT_CELLS_PER_GROUP * len(inst.delta)
    cells = min(default_cells, max_cells // inst.units)
    resolution = inst.span() / cells
    t_paper, paper_keep = timed(lambda: paper_solve(inst, resolution), 1)
    t_ours, ours = timed(lambda: ours_solve(inst, resolution), repeats)
    t_default, default = timed(lambda: ours_solve(inst, None), repeats)
    rows = {"paper": paper_keep, "ours": ours.keep.tolist(), "default": default.keep.tolist()}
    values = {k: inst.value(v) for k, v in rows.items()}
    return {
        "instance": inst.name, "groups": len(inst.delta), "units": inst.units, "cells": cells,
        "paper_s": t_paper, "ours_ms": t_ours * 1e3, "speedup": t_paper / t_ours,
        "paper_obj": values["paper"], "ours_obj": values["ours"],
        "ours_ge_paper": values["ours"] >= values["paper"],
        "default_cells": default_cells, "default_ms": t_default * 1e3,
        "default_obj": values["default"],
        "in_budget": all(inst.cost(v) <= inst.budget for v in rows.values()),
    }


COLUMNS = [
    ("instance", "{}"), ("groups", "{}"), ("units", "{}"), ("cells", "{}"),
    ("paper_s", "{:.2f}"), ("ours_ms", "{:.2f}"), ("speedup", "{:.0f}x"),
    ("paper_obj", "{:.3f}"), ("ours_obj", "{:.3f}"), ("ours_ge_paper", "{}"),
    ("default_cells", "{}"), ("default_ms", "{:.2f}"), ("default_obj", "{:.3f}"),
    ("in_budget", "{}"),
]


def print_row(row: dict[str, object], header: bool) -> None:
    if header:
        print("| " + " | ".join(name for name, _ in COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
    print("| " + " | ".join(fmt.format(row[name]) for name, fmt in COLUMNS) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small instances and a coarse baseline (about 15 s)")
    parser.add_argument("--max-cells", type=int, default=None,
                        help="most table updates the baseline may do per instance "
                             "(default 1.2e8, ~30-60 s each; --quick: 3e6)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs of our solver per row, median reported (default 20)")
    args = parser.parse_args(argv)
    max_cells = args.max_cells or (3_000_000 if args.quick else 120_000_000)
    repeats = args.repeats or (5 if args.quick else 20)
    sizes = (8, 16, 37) if args.quick else (16, 37, 64, 128)
    instances = [resnet50_instance()] + [random_instance(g, seed=g) for g in sizes]
    for i, inst in enumerate(instances):
        print_row(compare(inst, max_cells, repeats), header=i == 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
