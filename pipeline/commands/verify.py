"""``halp verify``: predicted vs measured latency of pruned variants; non-zero exit on failure."""

from __future__ import annotations

import argparse

from ..backends.timing import ROUNDS
from ..fsio import atomic_write_json
from ..lut import LatencyTable
from ..verify import plot, render, verify
from .common import add_model_args, model_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a LUT's predictions against measured engines",
                       description=__doc__)
    add_model_args(p)
    p.add_argument("--lut", required=True, help="latency table built for this model and device")
    p.add_argument("--samples", type=int, default=12, help="pruned architectures to measure")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="allowed mean absolute error as a fraction (default 0.10 = 10%%)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: what the LUT was measured with)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--rounds", type=int, default=ROUNDS,
                   help="interleaved measurement rounds per architecture, combined by the "
                        "timing protocol: fastest on CPU, median on GPU "
                        f"(default {ROUNDS})")
    p.add_argument("--calibration", choices=["affine", "constant"], default="affine",
                   help="re-fit the calibration in this run on the dense, half- and quarter-width "
                        "networks (affine, default) or on the dense network alone (constant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--plot", default=None, help="write the predicted-vs-measured PNG here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..backends import get_backend

    lut = LatencyTable.load(args.lut)  # format and contents checked before anything runs
    meta = lut.meta
    options: dict = {}
    if meta["backend"] != "tensorrt":  # CPU threads and device: as the table was measured
        on_gpu = str(meta.get("device_key", "")).startswith("cuda")
        options = {"threads": args.threads or meta.get("threads"),
                   "device": args.device or ("cuda" if on_gpu else None)}
        options = {k: v for k, v in options.items() if v is not None}
    backend = get_backend(meta["backend"], meta["precision"], **options)
    model, x = model_from_args(args)
    report = verify(model, x, lut, backend, samples=args.samples, tolerance=args.tolerance,
                    seed=args.seed, rounds=args.rounds, calibration=args.calibration,
                    lut_path=args.lut, name=args.model)
    print(render(report))
    if args.report:
        atomic_write_json(args.report, report.to_dict())
        print(f"wrote {args.report}")
    if args.plot:
        print(f"wrote {plot(report, args.plot)}")
    return 0 if report.passed else 1
