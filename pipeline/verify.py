"""Predicted-vs-measured latency regression: does the LUT still tell the truth on this device?

Samples pruned architectures (random per-group keep fractions in unit steps, plus coupled and
decoupled knapsack solutions at several targets), slims a copy of the model to each, measures
it on the LUT's own backend and compares with the LUT's prediction. The calibration is re-fitted
on reference networks measured in the same run, so the check is about the table's per-layer
entries and not about how fast the machine happens to be today (a shared CPU changes speed by
tens of percent over minutes):

- ``affine`` (default): scale and constant through the dense network and its half-width copy,
  as ``halp lut build`` calibrates (:mod:`pipeline.calibration`);
- ``constant``: the dense network alone pins the constant (dense measured − Σ dense entries),
  as the HALP paper calibrates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import nn

from .backends import Backend, Measurement
from .backends.timing import ROUNDS, interleaved
from .calibration import fit
from .errors import HalpError
from .lut import LatencyTable
from .planner import Planner
from .progress import progress as progress_bar
from .references import references
from .slim import slim
from .spec import NetworkSpec
from .structure import trace

KNAPSACK_TARGETS = (0.35, 0.5, 0.65, 0.8)
#: (solver, knapsack steps) per planned architecture: the coupled knapsack in one step, and
#: HALP's decoupled one in many small steps, as the pruner's schedule takes them
PLANS = (("coupled", 1), ("decoupled", 8))
#: a sample whose slow rounds (p90) took this many times its fast ones (p10) was measured on a
#: busy machine: on a 2-vCPU guest at 2 threads, any other runnable thread costs a round a
#: scheduler slice of several ms, 3-13x a 1 ms network (docs/BENCHMARKS.md, run J)
BUSY_SPREAD = 2.0
#: this run's dense network further than this from the table build's measurement of it: the
#: machine runs at another speed than it did then (on a 2-vCPU guest the same network measured
#: 7.96 ms in the build and 9.05 ms a minute later; docs/BENCHMARKS.md, run K)
SPEED_CHANGE = 0.10


@dataclass
class Sample:
    kind: str  # "dense", "random", "coupled@<target>" or "decoupled@<target>"
    counts: dict[int, int]
    predicted_ms: float
    measured_ms: float
    p10_ms: float
    p90_ms: float

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def spread(self) -> float:
        """p90 over p10 of its rounds: near 1 on a quiet machine."""
        return self.p90_ms / self.p10_ms if self.p10_ms > 0 else float("inf")


@dataclass
class VerifyReport:
    model: str
    input_shape: tuple[int, ...]
    backend: dict[str, Any]
    lut: str
    tolerance: float  # allowed mean absolute error, as a fraction
    dense_measured_ms: float
    calibration: str  # "affine" or "constant"
    scale: float
    constant_ms: float
    samples: list[Sample] = field(default_factory=list)
    #: the dense network as the table's build measured it (None: another input or no record)
    build_dense_ms: float | None = None

    @property
    def mape(self) -> float:
        """Mean absolute percentage error over the pruned samples, in percent."""
        return float(np.mean([abs(s.error_pct) for s in self.samples]))

    @property
    def max_abs_pct_error(self) -> float:
        return float(max(abs(s.error_pct) for s in self.samples))

    @property
    def spearman(self) -> float:
        return spearman([s.predicted_ms for s in self.samples],
                        [s.measured_ms for s in self.samples])

    @property
    def passed(self) -> bool:
        return self.mape <= 100.0 * self.tolerance

    @property
    def busy(self) -> list[Sample]:
        """Samples measured while the machine was busy (:data:`BUSY_SPREAD`): their errors say
        more about the machine than about the table."""
        return [s for s in self.samples if s.spread > BUSY_SPREAD]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mape": self.mape, "max_abs_pct_error": self.max_abs_pct_error,
            "spearman": self.spearman, "passed": self.passed, "tolerance": self.tolerance,
            "model": self.model, "input_shape": list(self.input_shape), "lut": self.lut,
            "backend": self.backend, "dense_measured_ms": self.dense_measured_ms,
            "calibration": self.calibration, "scale": self.scale,
            "constant_ms": self.constant_ms, "busy_samples": len(self.busy),
            "build_dense_ms": self.build_dense_ms,
            "samples": [{**asdict(s), "counts": {str(g): c for g, c in s.counts.items()},
                         "error_pct": s.error_pct, "spread": s.spread}
                        for s in self.samples],
        }


def speed_change(build_ms: float | None, run_ms: float) -> str | None:
    """A note when this run measures the dense network more than :data:`SPEED_CHANGE` away
    from the table's build: a shared machine's speed moves by that much within minutes, and the
    table check that follows (Σ entries against this run's dense network) then blames the table
    for the machine. This run's references set the calibration, so the samples stay comparable.
    """
    if not build_ms or abs(run_ms / build_ms - 1.0) <= SPEED_CHANGE:
        return None
    return (f"note: this run measured the dense network at {run_ms:.4g} ms, the table's build at "
            f"{build_ms:.4g} ms ({100 * (run_ms / build_ms - 1):+.0f}%): the machine runs at "
            "another speed than when the table was built (other load, clocks or neighbours). "
            "A table check below compares the table with today's speed; the samples are judged "
            "against references measured in this run")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties share their mean rank); nan where it is undefined: fewer
    than two samples, or one side constant (scipy would warn and return nan)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(a, b).statistic)


def random_counts(planner: Planner, rng: np.random.Generator, stratum: tuple[int, int] = (0, 1)
                  ) -> dict[int, int]:
    """Per-group keep fractions around a random global level, rounded to whole units.

    A shared level per sample spreads the samples from heavily pruned to nearly dense, which
    is what a rank correlation needs; the per-group jitter makes each architecture different.
    The level is drawn from the ``stratum`` (i, n): the i-th of n equal slices of its range,
    so n samples cover it evenly. Independent levels had put four of resnet18's eight random
    samples at 64x64 within 6% of each other (1.43-1.52 ms), where the host's noise, not the
    table, decides their ranks.
    """
    i, n = stratum
    level = 0.25 + 0.75 * (i + rng.uniform()) / n
    counts = {}
    for g, choices in planner.choices.items():
        frac = float(np.clip(level * rng.uniform(0.7, 1.3), 0.0, 1.0))
        counts[g] = int(choices[max(1, round(frac * (len(choices) - 1)))])
    return counts


def weight_saliency(model: nn.Module, spec: NetworkSpec, groups: Sequence[int]) -> dict:
    """L1 norm of each channel's producing filters: a data-free stand-in for Taylor saliency."""
    modules = dict(model.named_modules())
    out = {}
    for g in groups:
        total = torch.zeros(spec.group(g).channels)
        for name in spec.group(g).producers:
            w = modules[name].weight.detach()
            total += w.abs().flatten(1).sum(1) if w.dim() > 1 else w.abs()
        out[g] = total.numpy()
    return out


def _architectures(model: nn.Module, planner: Planner, samples: int,
                   seed: int) -> list[tuple[str, dict[int, int]]]:
    """``samples`` architectures to measure, as (kind, counts): each solver's plans (PLANS) at
    the feasible KNAPSACK_TARGETS (a third of the samples at most) and random ones for the
    rest."""
    dense = planner.dense_ms
    plans = [(solver, steps, t) for t in KNAPSACK_TARGETS if t * dense >= planner.minimum_ms
             for solver, steps in PLANS][:samples // 3]
    saliency = weight_saliency(model, planner.spec, planner.groups)
    chosen = [(f"{solver}@{t}",
               planner.solve(saliency, t * dense, steps=steps, solver=solver).counts)
              for solver, steps, t in plans]
    rng = np.random.default_rng(seed)
    n = samples - len(chosen)
    return chosen + [("random", random_counts(planner, rng, (i, n))) for i in range(n)]


def verify(
    model: nn.Module,
    example_input: torch.Tensor,
    lut: LatencyTable,
    backend: Backend,
    *,
    samples: int = 12,
    tolerance: float = 0.10,
    rounds: int = ROUNDS,
    calibration: str = "affine",
    seed: int = 0,
    lut_path: str = "",
    name: str | None = None,
    allow_mismatch: bool = False,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> VerifyReport:
    """Measure ``samples`` pruned variants of ``model`` and compare with the LUT's prediction.

    The LUT is validated against ``backend`` (backend, precision, device) and against the model's
    layers before anything is measured (``allow_mismatch`` skips the first: a table from
    another device then predicts this one, knowingly).
    """
    if samples < 2:
        raise HalpError(f"--samples {samples}: at least 2 samples are needed for a correlation")
    if calibration not in ("affine", "constant"):
        raise HalpError(f"calibration {calibration!r} is not 'affine' or 'constant'")
    desc = backend.describe()
    if not allow_mismatch:
        lut.check_backend(desc)
    model = copy.deepcopy(model).eval()
    # the pruner's view: its stem stays dense
    planner = Planner(trace(model, example_input, ignore_stem=True).spec, lut)
    spec = planner.spec
    chosen = _architectures(model, planner, samples, seed)
    refs = references(model, example_input, spec, step=int(lut.meta.get("step") or 8))
    refs = refs if calibration == "affine" else refs[:1]
    variants = refs + _slimmed(model, example_input, spec, chosen, progress)
    measured = _measure([v for _, _, v in variants], example_input, backend, rounds, progress)

    def entries_ms(counts: dict[int, int]) -> float:
        return sum(lut.layer_latencies(spec, counts, calibrated=False).values())

    same_input = list(lut.meta.get("input_shape") or []) == list(example_input.shape)
    build_ms = lut.dense_ms if same_input and not allow_mismatch else None
    if note := speed_change(build_ms, measured[0].ms):
        log(note)
    cal = fit(*((entries_ms(counts), m.ms)
                for (_, counts, _), m in zip(refs, measured[: len(refs)], strict=True)))
    report = VerifyReport(
        model=name or type(model).__name__, input_shape=tuple(example_input.shape),
        backend=desc.to_dict(), lut=lut_path, tolerance=tolerance,
        dense_measured_ms=measured[0].ms,
        calibration=calibration, scale=cal.scale, constant_ms=cal.constant_ms,
        build_dense_ms=build_ms,
    )
    log(f"dense: measured {measured[0].ms:.4g} ms, LUT entries {entries_ms(refs[0][1]):.4g} ms;"
        f" {calibration} calibration in this run: scale {cal.scale:.4g}, constant "
        f"{cal.constant_ms:.4g} ms (the table's own: {lut.scale:.4g}, {lut.constant_ms})")
    for (kind, counts, _), m in zip(variants[len(refs):], measured[len(refs):], strict=True):
        report.samples.append(Sample(kind, counts, cal.predict(entries_ms(counts)), m.ms,
                                     m.p10_ms, m.p90_ms))
    return report


def _slimmed(model: nn.Module, example_input: torch.Tensor, spec: NetworkSpec,
             chosen: list[tuple[str, dict[int, int]]], progress: bool
             ) -> list[tuple[str, dict[int, int], nn.Module]]:
    """Each architecture as a slimmed copy of ``model`` (``model`` itself where dense)."""
    out = []
    for kind, counts in progress_bar(chosen, desc="slim", unit="arch", disable=not progress):
        keep = {g: c for g, c in counts.items() if c < spec.group(g).channels}
        out.append((kind, counts, slim(model, example_input, keep, spec=spec) if keep else model))
    return out


def _measure(models: list[nn.Module], example_input: torch.Tensor, backend: Backend,
             rounds: int, progress: bool) -> list[Measurement]:
    """All models timed in interleaved rounds, so drift on the machine hits them alike."""
    timers = [backend.module_timer(m, example_input) for m in models]
    with progress_bar(total=rounds * len(timers), desc="measure", unit="run",
                      disable=not progress) as bar:
        return interleaved(timers, rounds, bar.update)
