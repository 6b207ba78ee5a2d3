"""The measurement protocol every backend shares.

A LUT is only as good as the agreement between its entries: every backend times a layer the same
way (warm-up, then N samples, median and an outlier-robust spread), differing only in the clock
(host ``perf_counter`` on CPU, CUDA events on GPU). Ops faster than the clock's useful resolution
are timed as a batch of back-to-back runs per sample.
"""

from __future__ import annotations

import math
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import numpy as np

from ..errors import HalpError
from ..kinds import DeviceKind, Statistic

#: ``time_batch(k)`` runs the op ``k`` times back to back and returns the elapsed milliseconds
BatchTimer = typing.Callable[[int], float]


@dataclass(frozen=True)
class Measurement:
    """Latency of one op: median and 10th/90th percentile of ``n`` samples, in milliseconds.

    ``inner`` is how many back-to-back runs each sample averaged (1 unless the op is very fast);
    ``statistic`` names which of median/p10 is the latency (:attr:`ms`).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    inner: int = 1
    statistic: Statistic = Statistic.MEDIAN

    @property
    def ms(self) -> float:
        """The latency, by the measurement protocol's statistic."""
        return self.p10_ms if self.statistic == Statistic.P10 else self.median_ms

    def to_dict(self) -> dict:
        return asdict(self)

    def less(self, ms: float) -> Measurement:
        """This measurement without a fixed cost of ``ms`` (never below a tenth of itself,
        should the fixed cost have been measured in a slower moment)."""
        def cut(value: float) -> float:
            return max(value - ms, 0.1 * value)

        return replace(self, median_ms=cut(self.median_ms), p10_ms=cut(self.p10_ms),
                       p90_ms=cut(self.p90_ms))

    def scaled(self, factor: float) -> Measurement:
        return replace(self, median_ms=self.median_ms * factor, p10_ms=self.p10_ms * factor,
                       p90_ms=self.p90_ms * factor)

    def toward(self, other: Measurement, share: float) -> Measurement:
        """This measurement moved ``share`` of the way to ``other`` (each statistic alike)."""
        def mix(a: float, b: float) -> float:
            return a + share * (b - a)

        return replace(self, median_ms=mix(self.median_ms, other.median_ms),
                       p10_ms=mix(self.p10_ms, other.p10_ms),
                       p90_ms=mix(self.p90_ms, other.p90_ms))

    def per_copy(self, copies: int) -> Measurement:
        """One copy's share of a run of ``copies`` identical ops (a packed graph)."""
        return self.scaled(1.0 / copies)

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], inner: int = 1,
                     statistic: Statistic = Statistic.MEDIAN) -> Measurement:
        samples = np.asarray(samples_ms, dtype=float)
        if samples.size == 0:
            raise ValueError("a measurement needs at least one sample")
        p10, median, p90 = np.percentile(samples, [10, 50, 90])
        return cls(float(median), float(p10), float(p90), int(samples.size), int(inner),
                   statistic)


@dataclass(frozen=True)
class TimingSettings:
    """How a backend measures: recorded in every LUT so tables built differently are visible.

    ``warmup`` runs (and at least ``warmup_ms`` of running) come first, then ``repeats``
    samples; each sample lasts at least ``min_sample_ms``. The defaults keep a CPU LUT quick
    to build; raise ``repeats`` for final tables. A short warm-up is enough because the
    statistic is a low percentile of the samples, not their mean: on the same 200 table points
    (resnet18 at 224x224, 2 threads, 3 passes) 3 runs / 2 ms priced the points within 0.1% of
    5 runs / 10 ms in sum, and cut the build by a quarter (docs/BENCHMARKS.md). ``statistic`` (a
    :class:`~pipeline.kinds.Statistic`): "auto" lets the device kind choose (:meth:`resolved`).
    """

    warmup: int = 3
    repeats: int = 15
    min_sample_ms: float = 0.2
    warmup_ms: float = 2.0
    statistic: Statistic | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1 or self.min_sample_ms < 0 or self.warmup_ms < 0:
            raise HalpError(
                f"timing settings {self.to_dict()} are invalid: need warmup >= 0, repeats >= 1, "
                "min_sample_ms >= 0 and warmup_ms >= 0"
            )
        if self.statistic not in (*Statistic, "auto"):
            raise HalpError(f"statistic {self.statistic!r} is not one of "
                            f"{', '.join(Statistic)} or auto")

    def resolved(self, kind: DeviceKind) -> TimingSettings:
        """These settings with an "auto" statistic replaced by the one for ``kind``: p10 on
        shared CPUs, whose interference only ever adds time, the median on GPUs."""
        if self.statistic != "auto":
            return self
        return replace(self, statistic=Statistic.P10 if kind == DeviceKind.CPU
                       else Statistic.MEDIAN)

    def to_dict(self) -> dict:
        """As table metadata records it: plain JSON values."""
        return {**asdict(self), "statistic": str(self.statistic)}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def warm_up(time_batch: BatchTimer, settings: TimingSettings) -> tuple[int, int]:
    """Run the protocol's warm-up; returns (runs done, back-to-back runs per sample)."""
    warm: list[float] = []
    start = time.perf_counter()
    while len(warm) < max(settings.warmup, 1) or (
        (time.perf_counter() - start) * 1e3 < settings.warmup_ms
    ):
        warm.append(time_batch(1))
    # the faster half of the warm-up estimates the steady-state time of one run
    per_run = max(float(np.median(sorted(warm)[: max(1, len(warm) // 2)])), 1e-6)
    return len(warm), max(1, math.ceil(settings.min_sample_ms / per_run))


def measure(time_batch: BatchTimer, settings: TimingSettings) -> Measurement:
    """Warm up, size the inner batch from the warm-up, then take ``settings.repeats`` samples."""
    _, inner = warm_up(time_batch, settings)
    samples = [time_batch(inner) / inner for _ in range(settings.repeats)]
    return Measurement.from_samples(samples, inner, settings.statistic)


#: interleaved rounds of a whole-network measurement (verify's samples, the calibration
#: references, prune's dense/pruned pair): a shared CPU's fast spells are short and rare (about
#: 15% of 100 ms windows on the CI host), and :func:`combine` keeps the fastest round there
ROUNDS = 9


def interleaved(timers: Sequence[Callable[[], Measurement]], rounds: int = ROUNDS,
                tick: Callable[[], object] | None = None) -> list[Measurement]:
    """Measure every timer once per round, round after round, and combine each one's rounds
    (:func:`combine`).

    Interleaving spreads slow drifts of the machine (clocks, neighbours on a shared host) over
    all variants alike instead of penalising whichever was measured during a slow spell.
    ``tick`` is called after each measurement (a progress bar's update).
    """
    results: list[list[Measurement]] = [[] for _ in timers]
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            results[i].append(timer())
            if tick is not None:
                tick()
    return [combine(r) for r in results]


def combine(measurements: Sequence[Measurement]) -> Measurement:
    """One measurement from repeats of the same op taken at different moments (interleaved
    rounds, build passes).

    Under the ``p10`` protocol (shared CPUs) the fastest repeat is kept: other tenants only ever
    slow a run down, and on a contended host they do so for seconds at a time, so every sample
    of a repeat can fall into one slow spell; the fastest window is the closest to the machine
    alone. Under ``median`` (GPUs, whose variation goes both ways: clocks, algorithm choice)
    each statistic is the median over the repeats. ``n`` counts every sample taken.
    """
    if not measurements:
        raise ValueError("combine needs at least one measurement")
    n = sum(m.n for m in measurements)
    if measurements[0].statistic == Statistic.P10:
        return replace(min(measurements, key=lambda m: m.ms), n=n)
    first = measurements[0]
    return Measurement(*(float(np.median([getattr(m, f) for m in measurements]))
                         for f in ("median_ms", "p10_ms", "p90_ms")),
                       n, first.inner, first.statistic)


def host_timer(run: Callable[[], object]) -> BatchTimer:
    """A :data:`BatchTimer` on the host clock, for backends that return when the work is done."""

    def time_batch(k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            run()
        return (time.perf_counter() - t0) * 1e3

    return time_batch
