"""Benchmark: a detector pruned end to end (issue 14).

`halp prune --task detection` on torchvision's SSDlite (MobileNetV3-large) at 320x320, trained
from scratch on the built-in digit scenes, pruned to a latency target on ONNX Runtime on this
CPU, then `halp verify` on the table it built. Prints dense vs pruned (measured and predicted
ms, MACs, params, mAP@0.5 and mAP@[.5:.95]), the verify figures and the wall time, and writes
``OUT/bench.json``. The run's stages resume from ``OUT`` (baseline, table, fine-tuning).

    .venv/bin/python tools/bench_detector.py --out engines/detector      # full run
    .venv/bin/python tools/bench_detector.py --quick --out /tmp/det      # CI test's run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.backends import get_backend_taking
from pipeline.commands.common import format_table, human
from pipeline.commands.prune import render
from pipeline.config import PruneConfig
from pipeline.detection.scenes import NUM_CLASSES
from pipeline.fsio import atomic_write_json
from pipeline.lut import LatencyTable
from pipeline.models import load_checkpoint, load_model
from pipeline.prune import run
from pipeline.verify import verify

MODEL = "ssdlite320_mobilenet_v3_large"
SETTINGS: dict[str, Any] = {
    "model": MODEL, "task": "detection", "input_shape": (1, 3, 320, 320), "target": 0.5,
    "data": "scenes:480", "baseline_epochs": 10, "epochs": 5, "steps": 10, "batch_size": 16,
    "lr": 0.05, "finetune_lr": 0.01}
QUICK: dict[str, Any] = {
    "data": "scenes:24", "baseline_epochs": 1, "epochs": 1, "steps": 2, "batch_size": 8,
    "target": 0.7, "lut_max_points": 3, "lut_passes": 1, "threads": 1, "relax_target": True}
VERIFY_SAMPLES = {False: 12, True: 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("engines/detector"))
    parser.add_argument("--quick", action="store_true",
                        help="tiny scenes, one epoch each, a coarse table (the CI test)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    args = parser.parse_args()
    settings = {**SETTINGS, **(QUICK if args.quick else {})}
    if args.threads is not None:
        settings["threads"] = args.threads
    cfg = PruneConfig(**settings, out=args.out, lut_cache=args.out / "luts")
    started = time.perf_counter()
    report = run(cfg)
    checked = _verify(cfg, report, VERIFY_SAMPLES[args.quick])
    result = {"prune": report, "verify": checked,
              "wall_seconds": time.perf_counter() - started, "quick": args.quick}
    atomic_write_json(args.out / "bench.json", result)
    print(render(report))
    print(format_table(["verify", "MAPE %", "worst %", "spearman", "samples"],
                       [[MODEL, f"{checked['mape']:.2f}", f"{checked['max_abs_pct_error']:.1f}",
                         f"{checked['spearman']:.3f}", str(len(checked['samples']))]]))
    print(f"pruned params {human(report['pruned']['params'])}; whole run "
          f"{result['wall_seconds'] / 60:.1f} min")


def _verify(cfg: PruneConfig, report: dict[str, Any], samples: int) -> dict[str, Any]:
    """`halp verify` on the dense detector core with the table the run built."""
    core = load_model(cfg.model, num_classes=NUM_CLASSES)
    baseline = next(cfg.out.glob("baseline-*.ckpt"), None)
    if baseline is not None:
        load_checkpoint(core, baseline)
    backend = get_backend_taking(cfg.backend, cfg.precision, threads=cfg.threads)
    lut = LatencyTable.load(report["lut"])
    return verify(core, torch.randn(*cfg.input_shape), lut, backend, samples=samples,
                  lut_path=report["lut"], name=cfg.model).to_dict()


if __name__ == "__main__":
    main()
