"""Prune SSDlite to a latency budget in your own training loop.

This is the script a user of HALP writes: their detector, their data, their loss and optimizer.
HALP needs three things from it: the deployable part of the detector (backbone and heads, what
the engine runs), a latency table measured for that part on the target, and one
``pruner.step()`` per iteration. Everything else is the user's.

    .venv/bin/python examples/prune_detector.py --out engines/ssdlite-example
    .venv/bin/python examples/prune_detector.py --data coco:/data/parts --num-classes 6 ...

It trains SSDlite from scratch on the built-in digit scenes (composed from real scans, not
photographs), builds an ONNX Runtime table for this CPU, prunes to half the latency while
fine-tuning, and reports dense vs pruned: latency measured and predicted, MACs, mAP.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

from pipeline.backends import get_backend
from pipeline.config import PruneConfig
from pipeline.detection.core import DetectorCore, with_core
from pipeline.detection.data import load_detection_data
from pipeline.detection.task import mean_ap
from pipeline.lut import LatencyTable, build_lut
from pipeline.prune import export_and_build, measure_pair
from pipeline.pruner import HalpPruner
from pipeline.structure import analyze

INPUT = (1, 3, 320, 320)  # SSDlite's transform resizes to 320x320: the engine's input


def train(detector, loader, optimizer, epochs: int, pruner: HalpPruner | None = None) -> None:
    """The user's loop: torchvision's SSD losses, SGD, a cosine schedule."""
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    detector.train()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        total = 0.0
        for images, targets in loader:
            losses = detector(list(images), targets)
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                raise SystemExit("the loss diverged: lower --lr")
            loss.backward()
            if pruner is not None:
                pruner.step()  # Taylor saliency; every `interval` calls a knapsack step
            optimizer.step()  # with a pruner, its optimizer hook re-applies the masks
            optimizer.zero_grad()
            schedule.step()
            total += loss.item()
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(loader):.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="scenes:1000")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes including the background (default: the data's)")
    parser.add_argument("--baseline-epochs", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    parser.add_argument("--lut", type=Path, default=None,
                        help="a table of this core measured on the target (halp lut build "
                        "--model ssdlite320_mobilenet_v3_large --input 1x3x320x320 ...); "
                        "default: measure one here")
    parser.add_argument("--max-points", type=int, default=8,
                        help="grid points per channel axis of a table measured here")
    parser.add_argument("--passes", type=int, default=3,
                        help="measurements per point of a table measured here")
    parser.add_argument("--out", type=Path, default=Path("engines/ssdlite-example"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    data = load_detection_data(args.data, INPUT, batch_size=args.batch_size)
    detector = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                             num_classes=args.num_classes or data.num_classes)
    core = DetectorCore(detector)  # shares its parameters with the detector
    x = torch.randn(*INPUT)

    print("1. baseline")
    optimizer = torch.optim.SGD(detector.parameters(), lr=args.lr, momentum=0.9,
                                weight_decay=4e-5)
    train(detector, data.train, optimizer, args.baseline_epochs)
    dense_map = mean_ap(detector, data.val)

    print("2. latency table of the deployable core")
    backend = get_backend("onnxruntime", threads=args.threads)
    spec = analyze(core, x, name="ssdlite320_mobilenet_v3_large")
    if args.lut is not None:
        lut = LatencyTable.load(args.lut)
    else:  # on this CPU, resumable: an interrupted build measures only what is missing
        lut = build_lut(spec, backend, out=args.out / "lut.json", model=core, example_input=x,
                        passes=args.passes, max_points=args.max_points)

    print(f"3. HALP to {args.target:.0%} of the dense latency while fine-tuning")
    optimizer = torch.optim.SGD(detector.parameters(), lr=args.lr / 5, momentum=0.9,
                                weight_decay=4e-5)
    steps = 10  # spread over the first part of the iterations (halp prune's span); the rest
    # recovers at the final architecture
    interval = max(1, int(PruneConfig.prune_span * args.epochs * len(data.train)) // steps)
    pruner = HalpPruner(core, x, lut, target=args.target, steps=steps, interval=interval,
                        optimizer=optimizer)
    train(detector, data.train, optimizer, args.epochs, pruner)
    slim_core = pruner.finalize()  # physically slimmed, checked equal to the masked core
    pruned_map = mean_ap(with_core(detector, slim_core), data.val)

    print("4. export, engines, measurement")
    dense_engine = export_and_build(core.eval(), x, backend, args.out, "dense")
    pruned_engine = export_and_build(slim_core.eval(), x, backend, args.out, "pruned")
    dense_ms, pruned_ms = measure_pair(dense_engine, pruned_engine, backend)
    slim_spec = analyze(slim_core, x)
    report = {
        "dense": {"measured_ms": dense_ms.ms, "predicted_ms": lut.predict(spec),
                  "macs": spec.total_macs, **dense_map},
        "pruned": {"measured_ms": pruned_ms.ms, "predicted_ms": lut.predict(slim_spec),
                   "macs": slim_spec.total_macs, **pruned_map},
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    for side, r in report.items():
        print(f"{side:7s} {r['measured_ms']:.3f} ms measured, {r['predicted_ms']:.3f} "
              f"predicted, {r['macs'] / 1e6:.0f}M MACs, mAP@0.5 {r['map50']:.1f}%, "
              f"mAP {r['map']:.1f}%")


if __name__ == "__main__":
    main()
