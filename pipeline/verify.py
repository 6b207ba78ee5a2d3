"""Predicted-vs-measured latency regression: does the LUT still tell the truth on this device?

Samples pruned architectures (random per-group keep fractions in unit steps, plus knapsack
solutions at several targets), slims a copy of the model to each, measures it on the LUT's own
backend and compares with the LUT's prediction. The calibration is re-fitted on reference
networks measured in the same run, so the check is about the table's per-layer entries and not
about how fast the machine happens to be today (a shared CPU changes speed by tens of percent
over minutes):

- ``affine`` (default): scale and constant through the dense network and its half-width copy,
  as ``halp lut build`` calibrates (:mod:`pipeline.calibration`);
- ``constant``: the dense network alone pins the constant (dense measured − Σ dense entries),
  as the HALP paper calibrates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .backends import Backend
from .backends.timing import ROUNDS, interleaved
from .calibration import fit, references
from .errors import HalpError
from .lut import LatencyTable
from .plotting import save_png, subplots
from .progress import progress as progress_bar
from .pruner import HalpPruner
from .slim import slim
from .spec import NetworkSpec

KNAPSACK_TARGETS = (0.35, 0.5, 0.65, 0.8)
#: knapsack steps per planned architecture (HALP prunes in many small steps, not one)
PLAN_STEPS = 8


@dataclass
class Sample:
    kind: str  # "dense", "random" or "knapsack@<target>"
    counts: dict[int, int]
    predicted_ms: float
    measured_ms: float
    p10_ms: float
    p90_ms: float

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.predicted_ms - self.measured_ms) / self.measured_ms


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "mape": self.mape, "max_abs_pct_error": self.max_abs_pct_error,
            "spearman": self.spearman, "passed": self.passed, "tolerance": self.tolerance,
            "model": self.model, "input_shape": list(self.input_shape), "lut": self.lut,
            "backend": self.backend, "dense_measured_ms": self.dense_measured_ms,
            "calibration": self.calibration, "scale": self.scale,
            "constant_ms": self.constant_ms,
            "samples": [{**asdict(s), "counts": {str(g): c for g, c in s.counts.items()},
                         "error_pct": s.error_pct} for s in self.samples],
        }


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):  # ties share their mean rank
        tie = x == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def random_counts(pruner: HalpPruner, rng: np.random.Generator) -> dict[int, int]:
    """Per-group keep fractions around a random global level, rounded to whole units.

    A shared level per sample spreads the samples from heavily pruned to nearly dense, which
    is what a rank correlation needs; the per-group jitter makes each architecture different.
    """
    level = rng.uniform(0.25, 1.0)
    counts = {}
    for g, choices in pruner.choices.items():
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
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> VerifyReport:
    """Measure ``samples`` pruned variants of ``model`` and compare with the LUT's prediction.

    The LUT is validated against ``backend`` (backend, precision, device) and against the model's
    layers before anything is measured.
    """
    if samples < 2:
        raise HalpError(f"--samples {samples}: at least 2 samples are needed for a correlation")
    desc = backend.describe()
    lut.check_backend(desc)
    model = copy.deepcopy(model).eval()
    planner = HalpPruner(model, example_input, lut, target=1.0, steps=1, interval=1,
                         log=lambda _msg: None)
    spec = planner.spec
    rng = np.random.default_rng(seed)
    targets = [t for t in KNAPSACK_TARGETS if t * planner.dense_ms >= planner.minimum_ms]
    n_knapsack = min(len(targets), samples // 3)
    saliency = weight_saliency(model, spec, list(planner.choices))
    plans = [(f"knapsack@{t}", planner.plan(t * planner.dense_ms, saliency, steps=PLAN_STEPS))
             for t in targets[:n_knapsack]]
    plans += [("random", random_counts(planner, rng)) for _ in range(samples - n_knapsack)]

    if calibration not in ("affine", "constant"):
        raise HalpError(f"calibration {calibration!r} is not 'affine' or 'constant'")
    refs = references(model, example_input, spec, step=int(lut.meta.get("step") or 8))
    refs = refs if calibration == "affine" else refs[:1]
    variants = list(refs)
    for kind, counts in progress_bar(plans, desc="slim", unit="arch", disable=not progress):
        keep = {g: c for g, c in counts.items() if c < spec.group(g).channels}
        variants.append((kind, counts, slim(model, example_input, keep, spec=spec)
                         if keep else model))
    timers = [backend.module_timer(v, example_input) for _, _, v in variants]
    with progress_bar(total=rounds * len(timers), desc="measure", unit="run",
                      disable=not progress) as bar:
        measured = interleaved(timers, rounds, bar.update)

    def entries_ms(counts: dict[int, int]) -> float:
        return sum(lut.layer_latencies(spec, counts, calibrated=False).values())

    cal = fit(*((entries_ms(counts), m.ms)
                for (_, counts, _), m in zip(refs, measured[: len(refs)], strict=True)))
    report = VerifyReport(
        model=name or type(model).__name__, input_shape=tuple(example_input.shape),
        backend=desc, lut=lut_path, tolerance=tolerance, dense_measured_ms=measured[0].ms,
        calibration=calibration, scale=cal.scale, constant_ms=cal.constant_ms,
    )
    log(f"dense: measured {measured[0].ms:.4g} ms, LUT entries {entries_ms(refs[0][1]):.4g} ms;"
        f" {calibration} calibration in this run: scale {cal.scale:.4g}, constant "
        f"{cal.constant_ms:.4g} ms (the table's own: {lut.scale:.4g}, {lut.constant_ms})")
    for (kind, counts, _), m in zip(variants[len(refs):], measured[len(refs):], strict=True):
        report.samples.append(Sample(kind, counts, cal.predict(entries_ms(counts)), m.ms,
                                     m.p10_ms, m.p90_ms))
    return report


def render(report: VerifyReport) -> str:
    from .commands.common import format_table

    rows = [[i, s.kind, s.predicted_ms, s.measured_ms, f"{s.error_pct:+.1f}"]
            for i, s in enumerate(report.samples)]
    table = format_table(["#", "architecture", "predicted ms", "measured ms", "error %"], rows)
    verdict = "PASS" if report.passed else "FAIL"
    return (f"{table}\n\n{report.model} @ {'x'.join(map(str, report.input_shape))} on "
            f"{report.backend['backend']} {report.backend['precision']} "
            f"({report.backend['device']}): dense measured {report.dense_measured_ms:.4g} ms\n"
            f"mean abs error {report.mape:.2f}%  worst {report.max_abs_pct_error:.2f}%  "
            f"spearman {report.spearman:.3f}  tolerance {100 * report.tolerance:.1f}%  "
            f"{verdict}")


def plot(report: VerifyReport, path: str | Path) -> Path:
    """Predicted vs measured scatter with the y = x line and the tolerance band."""
    pred = np.array([s.predicted_ms for s in report.samples])
    meas = np.array([s.measured_ms for s in report.samples])
    lo, hi = 0.9 * min(pred.min(), meas.min()), 1.1 * max(pred.max(), meas.max())
    fig, ax = subplots(figsize=(5, 5), dpi=120)
    line = np.linspace(lo, hi, 2)
    ax.plot(line, line, "k-", lw=1, label="predicted = measured")
    ax.fill_between(line, line * (1 - report.tolerance), line * (1 + report.tolerance),
                    color="tab:green", alpha=0.15, label=f"±{100 * report.tolerance:.0f}%")
    kinds = sorted({s.kind.split("@")[0] for s in report.samples})
    for kind in kinds:
        idx = [i for i, s in enumerate(report.samples) if s.kind.split("@")[0] == kind]
        ax.scatter(meas[idx], pred[idx], label=kind, s=25)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="measured ms", ylabel="predicted ms",
           title=f"{report.model}: MAPE {report.mape:.1f}%, ρ {report.spearman:.2f}")
    ax.legend(loc="upper left", fontsize=8)
    return save_png(fig, path)

