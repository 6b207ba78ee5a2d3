"""The measurement protocol every backend shares, and the device identity that goes with it.

A LUT is only as good as the agreement between its entries: every backend times a layer the same
way (warm-up, then N samples, median and an outlier-robust spread), differing only in the clock
(host ``perf_counter`` on CPU, CUDA events on GPU). Ops faster than the clock's useful resolution
are timed as a batch of back-to-back runs per sample.
"""

from __future__ import annotations

import math
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from ..errors import HalpError

#: ``time_batch(k)`` runs the op ``k`` times back to back and returns the elapsed milliseconds
BatchTimer = Callable[[int], float]


#: what a measurement reports as *the* latency. ``p10`` suits shared CPUs: interference from
#: other tenants only ever adds time, and a low percentile of many samples stays put while the
#: median swings by ±10% between seconds on such machines; GPUs timed with CUDA events are
#: steady enough for the median.
STATISTICS = ("median", "p10")


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
    statistic: str = "median"

    @property
    def ms(self) -> float:
        """The latency, by the measurement protocol's statistic."""
        return self.p10_ms if self.statistic == "p10" else self.median_ms

    def to_dict(self) -> dict:
        return asdict(self)

    def per_copy(self, copies: int) -> Measurement:
        """One copy's share of a run of ``copies`` identical ops (a packed graph)."""
        return replace(self, median_ms=self.median_ms / copies, p10_ms=self.p10_ms / copies,
                       p90_ms=self.p90_ms / copies)

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], inner: int = 1,
                     statistic: str = "median") -> Measurement:
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
    to build; raise ``repeats`` for final tables. ``statistic`` (see :data:`STATISTICS`):
    "auto" lets the backend choose (p10 on CPU, median on GPU).
    """

    warmup: int = 5
    repeats: int = 15
    min_sample_ms: float = 0.2
    warmup_ms: float = 10.0
    statistic: str = "auto"

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1 or self.min_sample_ms < 0 or self.warmup_ms < 0:
            raise HalpError(
                f"timing settings {self.to_dict()} are invalid: need warmup >= 0, repeats >= 1, "
                "min_sample_ms >= 0 and warmup_ms >= 0"
            )
        if self.statistic not in (*STATISTICS, "auto"):
            raise HalpError(f"statistic {self.statistic!r} is not one of "
                            f"{', '.join(STATISTICS)} or auto")

    def resolved(self, default: str) -> TimingSettings:
        """These settings with an "auto" statistic replaced by the backend's ``default``."""
        return replace(self, statistic=default) if self.statistic == "auto" else self

    def to_dict(self) -> dict:
        return asdict(self)

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
    if measurements[0].statistic == "p10":
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


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def simd_channels() -> int:
    """Channels a CPU convolution kernel processes at once: oneDNN and ONNX Runtime's MLAS
    block channels by 16 with AVX-512 and by 8 otherwise, so latency rises in steps of that."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return 16 if "avx512f" in line.split() else 8
    except OSError:
        pass
    return 8


def default_threads() -> int:
    """Physical cores this process may use: SMT siblings slow conv kernels more than they help."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            phys = ""
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    phys = value.strip()
                elif key.strip() == "core id":
                    cores.add((phys, value.strip()))
    except OSError:
        pass
    return max(1, min(usable or 1, len(cores) or usable or 1))


def slug(text: str, limit: int = 40) -> str:
    """A short lowercase id fragment: ``"Intel(R) Xeon(R) CPU @ 2.20GHz"`` becomes
    ``intel-xeon-cpu-2-20ghz``."""
    cleaned = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", cleaned).strip("-")[:limit].rstrip("-") or "unknown"
