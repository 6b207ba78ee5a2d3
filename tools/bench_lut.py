"""Benchmark LUT builds on ONNX Runtime CPU: cost of a build and additivity of the table.

For each model: how many points a build measures, how long it takes (and per measurement), and
how well the sum of the dense network's layer entries explains the measured dense network
(Σ LUT / dense; the rest is the calibration constant: stem pooling, adds, per-op overhead).

    .venv/bin/python tools/bench_lut.py --max-points 4 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from pipeline.backends import get_backend
from pipeline.commands.common import format_table
from pipeline.lut import build_lut
from pipeline.models import load_model, parse_shape
from pipeline.structure import analyze


def bench(name: str, shape: tuple[int, ...], args: argparse.Namespace, folder: Path) -> list:
    torch.manual_seed(0)
    model = load_model(name).eval()
    x = torch.randn(*shape)
    spec = analyze(model, x, name=name)
    backend = get_backend("onnxruntime", threads=args.threads, repeats=args.repeats)
    table = build_lut(spec, backend, step=args.step, max_points=args.max_points,
                      out=folder / f"{name}.json", progress=not args.quiet)
    build_s = table.meta["build_s"]  # measuring time, summed over resumed runs
    dense = backend.time_module(model, x)
    layers = sum(table.layer_latencies(spec, calibrated=False).values())
    points = table.meta["points"]
    return [name, len(table.entries), points, build_s, 1e3 * build_s / points,
            dense.ms, layers, layers / dense.ms, dense.ms - layers]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--input", default="1x3x224x224")
    p.add_argument("--step", type=int, default=8)
    p.add_argument("--max-points", type=int, default=4,
                   help="grid points per channel axis (default 4: a few minutes on 2 cores)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15, help="timed samples per measurement")
    p.add_argument("--keep", default=None, help="folder to keep the tables in")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()
    shape = parse_shape(args.input)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        rows = [bench(name, shape, args, folder) for name in args.models]
    print(f"\nONNX Runtime CPU, {args.threads} thread(s), input {args.input}, step {args.step}, "
          f"max points {args.max_points}, {args.repeats} repeats")
    print(format_table(["model", "signatures", "points", "build s", "ms/point", "dense ms",
                        "Σ LUT ms", "Σ/dense", "constant ms"], rows))


if __name__ == "__main__":
    main()
