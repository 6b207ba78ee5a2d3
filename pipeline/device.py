"""Measure a planned latency table on the device itself, without torch.

``halp lut plan`` (on a workstation, with the model) writes a job; on the Jetson::

    python -m pipeline.device job.json --backend tensorrt --precision fp16 --out part.json

measures it with only numpy, onnx and the runtime installed (TensorRT with polygraphy and
pycuda, or ONNX Runtime): the layer graphs are generated from the job's geometry
(:mod:`pipeline.onnx_layers`) and the calibration references are the job's ONNX files. The
build is journaled beside ``--out`` and resumes when rerun; ``--shard i/n`` measures every n-th
point, so n devices of the same kind split a table and ``halp lut merge --job job.json`` joins
and calibrates the parts. The measuring itself is :func:`pipeline.lut.measure.measure_table`,
the same code ``halp lut build`` runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .cli import run_parsed
from .commands.common import (
    OUTPUT_FILE,
    READABLE_FILE,
    add_backend_args,
    backend_from_args,
    checked,
)
from .engine import random_inputs
from .errors import HalpError
from .lut.job import Job
from .lut.journal import journal_path
from .lut.measure import Reference, measure_table


def parse_shard(text: str) -> list[int]:
    """``"i/n"`` as [i, n] (1 <= i <= n): an argparse type (:func:`checked`)."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise HalpError(f"--shard {text!r} is not i/n (e.g. 2/4)") from None
    if not 1 <= i <= n:
        raise HalpError(f"--shard {text}: need 1 <= i <= n")
    return [i, n]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.device",
        description="Measure a table job planned by `halp lut plan`, on this device, without "
                    "torch; an interrupted build resumes from its journal.")
    parser.add_argument("job", type=READABLE_FILE, help="the job (JSON) from `halp lut plan`")
    add_backend_args(parser)
    parser.add_argument("--shard", type=checked(parse_shard), default=None,
                        help="i/n: measure every n-th point from the i-th (one device of n); "
                             "shard 1 also measures the calibration references")
    parser.add_argument("--out", required=True, type=OUTPUT_FILE,
                        help="table (or shard) to write (JSON); journal beside it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    job_path = Path(args.job)
    job = Job.load(job_path)
    shard = args.shard
    backend = backend_from_args(args)

    def references() -> list[Reference]:
        return [(r.name, r.counts, backend.onnx_timer(
                    job_path.parent / r.onnx,
                    random_inputs({r.input_name: tuple(job.spec.input_shape)},
                                  job.settings.seed)))
                for r in job.references]

    try:
        table = measure_table(job.spec, job.entries, backend,
                              replace(job.settings, shard=shard), Path(args.out), references,
                              model=job.model, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"progress is kept in {journal_path(args.out)}: rerun the same command to resume",
              file=sys.stderr)
        raise
    part = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    print(f"{table.meta['points']} points of {len(table.entries)} signatures{part}, "
          f"{table.meta['build_s']} s of measuring on {table.meta['device']}")
    if table.meta.get("check"):
        print(f"check: raw entries sum to {100 * table.meta['check']['additivity']:.1f}% of the "
              f"measured dense network; fit scale {table.scale:.3g}, constant "
              f"{table.constant_ms:+.3g} ms")
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_parsed(_parser(), argv, lambda _: "pipeline.device")


if __name__ == "__main__":
    sys.exit(main())
