"""``halp prune`` (your model, data and LUT) and ``halp demo`` (the built-in default)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

from ..config import PruneConfig
from .common import OUTPUT_FOLDER, checked, format_table, human

#: the demo: torchvision resnet18 on scikit-learn's bundled digits at 64x64 (large enough that
#: convolutions, not per-op overhead, dominate), ONNX Runtime on this CPU with one pinned thread
#: (stable timings on a shared 2-core machine), half the dense latency
DEMO: dict[str, Any] = {"model": "resnet18", "data": "digits", "input_shape": (1, 3, 64, 64),
                        "threads": 1, "target": 0.5, "baseline_epochs": 8, "epochs": 6,
                        "steps": 10, "relax_target": True}
DEMO_OUT = Path("engines/demo")
#: the report's scores, as the summary labels them (a classifier's top-1, a detector's mAP)
SCORES = {"top1": "top-1 %", "map50": "mAP@0.5 %", "map": "mAP@[.5:.95] %"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model to a latency target and build its engine",
                       description=__doc__)
    add_config_args(p)
    p.set_defaults(func=run_prune)

    d = sub.add_parser("demo", help="the whole pipeline on the built-in default (resnet18, "
                       "digits, ONNX Runtime CPU, 50%% latency)")
    d.add_argument("--out", default=DEMO_OUT, type=OUTPUT_FOLDER,
                   help=f"output folder (default {DEMO_OUT})")
    d.set_defaults(func=run_demo)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One flag per PruneConfig field, with the field's default, help, parser and check: a
    setting is defined once, in :class:`~pipeline.config.PruneConfig`."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(PruneConfig):
        meta = f.metadata
        group = meta["group"]
        if group is not None and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        target = parser if group is None else groups[group]
        target.add_argument(f"--{(meta['flag'] or f.name).replace('_', '-')}", dest=f.name,
                            **_argument(f))


def _argument(f: Field) -> dict[str, Any]:
    """argparse keywords for one field: a switch for booleans, else a checked value."""
    meta = f.metadata
    default = f.default
    doc = meta["doc"].replace("%", "%%")
    if isinstance(default, bool):
        return {"action": "store_true", "help": doc}
    parse = meta["parse"] or (str if default in (MISSING, None) else type(default))
    options = {"type": checked(parse, meta["check"]), "help": doc}
    if default is MISSING:
        options["required"] = True
    else:
        options["default"] = default
        if default is not None:
            options["help"] = f"{doc} (default {default})"
    if meta["choices"]:
        options["choices"] = meta["choices"]
    else:
        options["metavar"] = (meta["flag"] or f.name).upper()
    return options


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    return PruneConfig(**{f.name: getattr(args, f.name) for f in fields(PruneConfig)})


def run_prune(args: argparse.Namespace) -> int:
    return _run(config_from_args(args))


def run_demo(args: argparse.Namespace) -> int:
    return _run(PruneConfig(**DEMO, out=Path(args.out)))


def _run(cfg: PruneConfig) -> int:
    """Run the pipeline and print its summary. The config passed its checks when it was made;
    only now do torch, the data and the runtimes load."""
    from ..prune import run

    print(render(run(cfg)))
    return 0


def render(report: dict[str, Any]) -> str:
    """Dense vs pruned: size, predicted and measured latency, accuracy."""
    d, p = report["dense"], report["pruned"]
    rows = [
        ["parameters", human(d["params"]), human(p["params"]), f"{d['params'] / p['params']:.2f}x"],
        ["MACs", human(d["macs"]), human(p["macs"]), f"{d['macs'] / p['macs']:.2f}x"],
        ["predicted ms", f"{d['predicted_ms']:.4g}", f"{p['predicted_ms']:.4g}",
         f"{report['speedup_predicted']:.2f}x"],
        ["measured ms", f"{d['measured_ms']:.4g}", f"{p['measured_ms']:.4g}",
         f"{report['speedup_measured']:.2f}x"],
        *([label, f"{d[key]:.2f}", f"{p[key]:.2f}", f"{p[key] - d[key]:+.2f}"]
          for key, label in SCORES.items() if key in d),
    ]
    table = format_table(["", "dense", "pruned", "ratio"], rows)
    return (f"\n{report['model']} on {report['data']} @ {'x'.join(map(str, report['input_shape']))}"
            f", {report['backend']} {report['precision']} ({report['device']}), target "
            f"{report['target_ms']:.4g} ms\n{table}\nwall time {report['wall_seconds']:.0f} s")
