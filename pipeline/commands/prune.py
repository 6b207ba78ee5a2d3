"""``halp prune`` (your model, data and LUT) and ``halp demo`` (the built-in default)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..models import parse_shape
from ..prune import PruneConfig, run

#: the demo: torchvision resnet18 on scikit-learn's bundled digits at 64x64 (large enough that
#: convolutions, not per-op overhead, dominate), ONNX Runtime on this CPU with one pinned thread
#: (stable timings on a shared 2-core machine), half the dense latency
DEMO = PruneConfig(model="resnet18", data="digits", input_shape=(1, 3, 64, 64),
                   out=Path("engines/demo"), threads=1, target=0.5, baseline_epochs=8, epochs=6,
                   steps=10, relax_target=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model to a latency target and build its engine",
                       description=__doc__)
    p.add_argument("--model", required=True,
                   help="torchvision name, module:callable or saved nn.Module")
    p.add_argument("--checkpoint", default=None,
                   help="trained weights (state_dict); without it a baseline is trained first")
    p.add_argument("--data", required=True, help="digits | imagefolder:PATH (train/ and val/)")
    p.add_argument("--input", required=True, help="input shape, e.g. 1x3x224x224")
    p.add_argument("--lut", default="auto",
                   help="latency table, or auto: build for --backend and cache under luts/cache")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for onnxruntime")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target", type=float, default=0.5,
                        help="latency target as a fraction of the dense model (default 0.5)")
    target.add_argument("--target-ms", type=float, default=None, help="latency target in ms")
    p.add_argument("--epochs", type=int, default=6, help="HALP fine-tuning epochs")
    p.add_argument("--baseline-epochs", type=int, default=10,
                   help="epochs to train a baseline when no --checkpoint is given")
    p.add_argument("--steps", type=int, default=10, help="pruning steps")
    p.add_argument("--lr", type=float, default=0.05, help="baseline learning rate")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lut-max-points", type=int, default=8,
                   help="LUT grid points per channel axis when --lut auto builds one")
    p.add_argument("--lut-passes", type=int, default=PruneConfig.lut_passes,
                   help="measurements per LUT point, in separately shuffled passes, when --lut "
                        f"auto builds one (default {PruneConfig.lut_passes})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (e.g. engines/<name>)")
    p.set_defaults(func=run_prune)

    d = sub.add_parser("demo", help="the whole pipeline on the built-in default (resnet18, "
                       "digits, ONNX Runtime CPU, 50%% latency)")
    d.add_argument("--out", default=str(DEMO.out), help=f"output folder (default {DEMO.out})")
    d.set_defaults(func=run_demo)


def run_prune(args: argparse.Namespace) -> int:
    cfg = PruneConfig(
        model=args.model, data=args.data, input_shape=parse_shape(args.input),
        out=Path(args.out), lut=args.lut, checkpoint=args.checkpoint, backend=args.backend,
        precision=args.precision, threads=args.threads,
        target=None if args.target_ms is not None else args.target, target_ms=args.target_ms,
        baseline_epochs=args.baseline_epochs, epochs=args.epochs, steps=args.steps, lr=args.lr,
        finetune_lr=args.finetune_lr, batch_size=args.batch_size,
        lut_max_points=args.lut_max_points, lut_passes=args.lut_passes, seed=args.seed,
    )
    run(cfg)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    cfg = PruneConfig(**{**DEMO.__dict__, "out": Path(args.out)})
    run(cfg)
    return 0
