"""``halp verify``: predicted vs measured latency of pruned variants; non-zero exit on failure."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..backends.timing import ROUNDS
from ..config import at_least, non_negative
from ..fsio import atomic_write_json
from ..plotting import save_png, subplots
from .common import (
    OUTPUT_FILE,
    POSITIVE_INT,
    READABLE_FILE,
    add_model_args,
    checked,
    format_table,
    model_from_args,
)

if TYPE_CHECKING:
    from ..backends import Backend
    from ..lut import LatencyTable
    from ..verify import VerifyReport

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a LUT's predictions against measured engines",
                       description=__doc__)
    add_model_args(p)
    p.add_argument("--lut", required=True, type=READABLE_FILE,
                   help="latency table built for this model and device")
    p.add_argument("--samples", type=checked(int, at_least(2)), default=12,
                   help="pruned architectures to measure (at least 2, for a correlation)")
    p.add_argument("--tolerance", type=checked(float, non_negative), default=0.10,
                   help="allowed mean absolute error as a fraction (default 0.10 = 10%%)")
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="CPU threads (default: what the LUT was measured with)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--rounds", type=POSITIVE_INT, default=ROUNDS,
                   help="interleaved measurement rounds per architecture, combined by the "
                        f"timing protocol: fastest on CPU, median on GPU (default {ROUNDS})")
    p.add_argument("--calibration", choices=["affine", "constant"], default="affine",
                   help="re-fit the calibration in this run on the dense, half- and quarter-width "
                        "networks (affine, default) or on the dense network alone (constant)")
    p.add_argument("--allow-lut-mismatch", action="store_true",
                   help="measure with --threads/--device other than the table's (its latencies "
                        "then come from another target)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, type=OUTPUT_FILE,
                   help="write the JSON report here")
    p.add_argument("--plot", default=None, type=OUTPUT_FILE,
                   help="write the predicted-vs-measured PNG here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..lut import LatencyTable
    from ..verify import verify

    lut = LatencyTable.load(args.lut)  # format and contents checked before anything runs
    backend = _backend_for(lut, args)
    model, x = model_from_args(args)
    report = verify(model, x, lut, backend, samples=args.samples, tolerance=args.tolerance,
                    seed=args.seed, rounds=args.rounds, calibration=args.calibration,
                    lut_path=args.lut, name=args.model,
                    allow_mismatch=args.allow_lut_mismatch)
    print(render(report))
    if args.report:
        atomic_write_json(args.report, report.to_dict())
        print(f"wrote {args.report}")
    if args.plot:
        print(f"wrote {plot(report, args.plot)}")
    return 0 if report.passed else 1


def _backend_for(lut: LatencyTable, args: argparse.Namespace) -> Backend:
    """The table's own backend and precision; CPU threads and device as it was measured unless
    the flags say otherwise."""
    from ..backends import get_backend_taking
    from ..backends.device import kind_of

    meta = lut.meta
    return get_backend_taking(meta["backend"], meta["precision"],
                              threads=args.threads or meta.get("threads"),
                              device=args.device or str(kind_of(meta["device_key"])))


def render(report: VerifyReport) -> str:
    """One row per measured architecture, then the verdict against the tolerance."""
    rows = [[i, s.kind, s.predicted_ms, s.measured_ms, f"{s.error_pct:+.1f}"]
            for i, s in enumerate(report.samples)]
    table = format_table(["#", "architecture", "predicted ms", "measured ms", "error %"], rows)
    verdict = "PASS" if report.passed else "FAIL"
    return (f"{table}\n\n{report.model} @ {'x'.join(map(str, report.input_shape))} on "
            f"{report.backend['backend']} {report.backend['precision']} "
            f"({report.backend['device']}): dense measured {report.dense_measured_ms:.4g} ms\n"
            f"mean abs error {report.mape:.2f}%  worst {report.max_abs_pct_error:.2f}%  "
            f"spearman {report.spearman:.3f}  tolerance {100 * report.tolerance:.1f}%  "
            f"{verdict}{_busy_warning(report)}")


def _busy_warning(report: VerifyReport) -> str:
    """A warning line where samples were measured on a busy machine, with what to do."""
    from ..verify import BUSY_SPREAD  # torch comes with it: only once a report exists

    busy = report.busy
    if not busy:
        return ""
    worst = max(s.spread for s in busy)
    return (f"\nwarning: {len(busy)} of {len(report.samples)} samples were measured while the "
            f"machine was busy (slow rounds up to {worst:.1f}x their fastest, more than "
            f"{BUSY_SPREAD:g}x): even their fastest rounds may be slowed, so a large error "
            "on them says more about the machine than about the table. "
            "Measure with nothing else running, or with --threads below the CPUs this machine "
            "has (a 2-vCPU guest at 2 threads loses a scheduler slice to any other thread)")


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
