"""The closed vocabularies shared across the package: layer ops, precisions, device kinds,
timing statistics and knapsack solvers.

They are written into tables, journals and specs as plain strings, so each is a string enum:
a member compares, hashes, formats and serializes as its value, and files stay as they were.
Python 3.10 has no ``enum.StrEnum``, hence :class:`Name`. Torch-free, so a table is read and
queried without loading torch.
"""

from __future__ import annotations

from enum import Enum


class Name(str, Enum):
    """A string enum: ``str(member)`` and ``f"{member}"`` are the value (as ``enum.StrEnum``)."""

    def __str__(self) -> str:
        return str.__str__(self)


class OpKind(Name):
    """What a :class:`~pipeline.spec.LayerSpec` computes: the latency model's layer kinds."""

    CONV = "conv"
    DWCONV = "dwconv"  # depthwise: cin == cout, one filter per channel
    LINEAR = "linear"
    DECONV = "deconv"


class Precision(Name):
    """The arithmetic an engine runs in; a table is only valid at the precision it was built."""

    FP32 = "fp32"
    FP16 = "fp16"


class DeviceKind(Name):
    """Where a backend runs: it decides the clock, the default statistic and the channel step."""

    CPU = "cpu"
    CUDA = "cuda"


class Statistic(Name):
    """What a measurement reports as *the* latency.

    ``p10`` suits shared CPUs: interference from other tenants only ever adds time, and a low
    percentile of many samples stays put while the median swings by ±10% between seconds on
    such machines; GPUs timed with CUDA events are steady enough for the median.
    """

    MEDIAN = "median"
    P10 = "p10"


class Solver(Name):
    """How the planner picks channel counts (:mod:`pipeline.planner`)."""

    COUPLED = "coupled"  # every layer at its true (cin, cout); never worse than DECOUPLED
    DECOUPLED = "decoupled"  # HALP's: inputs at today's counts, then tightened
    HIGHS = "highs"  # the coupled problem as a MILP for HiGHS: the slow exact reference
