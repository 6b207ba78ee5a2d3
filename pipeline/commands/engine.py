"""``halp engine``: build a deployable engine from an ONNX file and measure it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import DEPLOY_BACKENDS
from .common import OUTPUT_FOLDER, READABLE_FILE, add_backend_args, backend_from_args, format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="build and time an engine from an ONNX file",
                       description=__doc__)
    p.add_argument("--onnx", required=True, type=READABLE_FILE,
                   help="ONNX model with static input shapes")
    add_backend_args(p, choices=DEPLOY_BACKENDS)
    p.add_argument("--out", required=True, type=OUTPUT_FOLDER,
                   help="output folder (engines/<name>/)")
    p.add_argument("--name", default=None, help="engine file name (default: the ONNX stem)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import onnx

    from .. import engine

    backend = backend_from_args(args)
    name = args.name or Path(args.onnx).stem
    built = engine.build(args.onnx, backend, args.out, name=name)
    measured = engine.measure(built, backend)
    desc = backend.describe()
    report = {
        "model": name,
        "onnx": str(args.onnx),
        "engine": str(built.path),
        "input_shape": {k: list(v) for k, v in built.inputs.items()},
        "channel_counts": engine.channel_counts(onnx.load(args.onnx)),
        "backend": desc.backend,
        "precision": desc.precision,
        "device": desc.device,
        "predicted_ms": None,
        "measured_ms": measured.ms,
        "measurement": measured.to_dict(),
        "versions": desc.versions,
    }
    path = engine.write_report(args.out, report)
    headers = ["engine", "backend", "precision", f"latency ms ({measured.statistic})",
               "median ms", "p10 ms", "p90 ms"]
    print(format_table(headers, [[str(built.path), desc.backend, desc.precision,
                                  measured.ms, measured.median_ms, measured.p10_ms,
                                  measured.p90_ms]]))
    print(f"wrote {path}")
    return 0

