"""What a user would pick instead of HALP, on HALP's footing: Torch-Pruning and uniform width.

Issue 12's comparison (``tools/bench_peers.py``) prunes one trained baseline with each method,
fine-tunes every result on the schedule `halp prune` gives HALP, and compares them at equal
measured latency. This module holds the two peers and the matching:

- :class:`TorchPruningSchedule`: Torch-Pruning's own ``BasePruner`` with its group Taylor
  importance (the saliency family HALP uses), global pruning and ``round_to`` = the table's
  step, pruning in iterative steps at HALP's cadence during fine-tuning;
- :func:`uniform_counts`: every prunable group scaled by one width factor;
- :func:`solve_decreasing`: the pruning ratio or width factor that meets a goal (latency
  predicted by the table, or MACs), by bisection.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .errors import HalpError
from .lut import LatencyTable
from .planner import Planner
from .slim import slim
from .spec import NetworkSpec
from .structure import analyze
from .verify import weight_saliency


def dense_layers(model: nn.Module, spec: NetworkSpec) -> list[nn.Module]:
    """The modules producing channels that HALP leaves dense (the stem's group, the
    classifier's output, groups the latency model cannot size): Torch-Pruning is told to leave
    them alone too, so every method prunes the same channels."""
    modules = dict(model.named_modules())
    pruned = set(spec.sizable_groups())
    return [modules[name] for g in spec.groups if g.id not in pruned for name in g.producers]


class TorchPruningSchedule:
    """Torch-Pruning's ``BasePruner`` (group Taylor importance, global pruning, ``round_to``)
    taking ``steps`` iterative steps towards ``ratio``, one every ``interval`` iterations.

    It plugs into :func:`~pipeline.train.fit` as ``after_backward``, where the batch's gradients
    exist (Taylor importance reads them). Torch-Pruning removes channels in place, so
    :meth:`step` returns True when the parameters were replaced, and ``fit`` hands the new ones
    to its optimizer. ``spec`` is HALP's view of ``model`` (its dense groups are left alone).
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, spec: NetworkSpec,
                 ratio: float, *, steps: int, interval: int, round_to: int):
        if not 0.0 <= ratio < 1.0:
            raise HalpError(f"pruning ratio {ratio} is not in [0, 1)")
        self.steps, self.interval = steps, interval
        self.calls = self.taken = 0
        self.pruner = tp.pruner.BasePruner(
            model, example_input, importance=tp.importance.GroupTaylorImportance(),
            global_pruning=True, pruning_ratio=ratio, iterative_steps=steps,
            round_to=round_to, ignored_layers=dense_layers(model, spec))

    @property
    def done(self) -> bool:
        return self.taken >= self.steps

    def step(self) -> bool:
        """Count an iteration; on schedule prune once. True when the model changed."""
        self.calls += 1
        if self.done or self.calls % self.interval:
            return False
        self.pruner.step()
        self.taken += 1
        return True


def taylor_oneshot(model: nn.Module, example_input: torch.Tensor, spec: NetworkSpec,
                   ratio: float, batches: Iterable, round_to: int) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning to ``ratio`` in one step, its Taylor
    importance from the gradients of ``batches``: what the schedule's architecture will be
    close to, cheap enough to search the ratio with."""
    pruned = copy.deepcopy(model).train()
    schedule = TorchPruningSchedule(pruned, example_input, spec, ratio, steps=1, interval=1,
                                    round_to=round_to)
    for images, labels in batches:
        F.cross_entropy(pruned(images), labels).backward()
    schedule.step()
    pruned.zero_grad(set_to_none=True)
    return pruned.eval()


def uniform_counts(planner: Planner, factor: float) -> dict[int, int]:
    """Each group the planner prunes at ``factor`` of its channels, rounded to its unit (at
    least one unit): uniform width."""
    counts = {}
    for g, choices in planner.choices.items():
        allowed = choices[choices > 0]
        want = factor * planner.spec.group(g).channels
        counts[g] = int(allowed[np.argmin(np.abs(allowed - want))])
    return counts


def uniform_model(model: nn.Module, example_input: torch.Tensor, planner: Planner,
                  factor: float) -> nn.Module:
    """``model`` slimmed to uniform width ``factor``, keeping each group's channels of largest
    L1 filter norm (the data-free criterion of uniform-width baselines)."""
    counts = uniform_counts(planner, factor)
    scores = weight_saliency(model, planner.spec, list(counts))
    keep = {g: np.sort(np.argsort(-scores[g], kind="stable")[:n]) for g, n in counts.items()}
    return slim(model, example_input, keep, spec=planner.spec)


def solve_decreasing(value: Callable[[float], float], goal: float, lo: float, hi: float, *,
                     rtol: float = 0.005, iterations: int = 14) -> float:
    """The ``x`` in [lo, hi] at which a decreasing ``value(x)`` comes closest to ``goal``, by
    bisection (stops once within ``rtol``): the ratio or factor that meets a latency or MACs
    goal."""
    best, best_err = lo, float("inf")
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        got = value(mid)
        err = abs(got / goal - 1.0)
        if err < best_err:
            best, best_err = mid, err
        if err <= rtol:
            break
        lo, hi = (mid, hi) if got > goal else (lo, mid)
    return best


def predicted_ms(lut: LatencyTable, model: nn.Module, example_input: torch.Tensor) -> float:
    """The table's prediction for any pruned copy of the model it was built for."""
    return lut.predict(analyze(model, example_input))


def macs(model: nn.Module, example_input: torch.Tensor) -> int:
    return analyze(model, example_input).total_macs
