"""``halp analyze``: the layers and coupled channel groups HALP will time and prune."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..fsio import atomic_write_text
from .common import OUTPUT_FILE, add_model_args, format_table, human, model_from_args

if TYPE_CHECKING:
    from ..spec import NetworkSpec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="print a model's layers and coupled channel groups",
                       description=__doc__)
    add_model_args(p)
    p.add_argument("--ignore", nargs="*", default=[],
                   help="layer names whose channel groups must not be pruned")
    p.add_argument("--json", default=None, type=OUTPUT_FILE,
                   help="also write the NetworkSpec as JSON here")
    p.set_defaults(func=run)
    m = sub.add_parser("models", help="list the torchvision model names --model accepts")
    m.set_defaults(func=run_models)


def run_models(_args: argparse.Namespace) -> int:
    from ..models import torchvision_names

    print("\n".join(torchvision_names()))
    return 0


def run(args: argparse.Namespace) -> int:
    from ..structure import analyze

    model, x = model_from_args(args)
    spec = analyze(model, x, ignore=args.ignore, name=args.model)
    print(render(spec))
    if args.json:
        atomic_write_text(args.json, spec.to_json())
        print(f"\nwrote {args.json}")
    return 0


def render(spec: NetworkSpec) -> str:
    groups = format_table(
        ["group", "channels", "prunable", "producers", "consumers", "bn",
         "first producer / why not"],
        [[g.id, g.channels, "yes" if g.prunable else "no", len(g.producers), len(g.consumers),
          len(g.norms), g.producers[0] if g.prunable else g.reason] for g in spec.groups],
    )
    layers = format_table(
        ["layer", "op", "kernel", "stride", "in hw", "cin", "cout", "in grp", "out grp", "act",
         "MACs"],
        [[lay.name, lay.op, "x".join(map(str, lay.kernel)) or "-",
          "x".join(map(str, lay.stride)) or "-", "x".join(map(str, lay.in_hw)) or "-",
          lay.cin, lay.cout,
          lay.in_group if len(lay.in_sources) <= 1 else "+".join(
              "-" if g is None else str(g) for g, _ in lay.in_sources),
          lay.out_group, lay.act, human(lay.macs)] for lay in spec.layers],
    )
    prunable = spec.prunable_groups
    totals = (
        f"{spec.model or 'model'} @ {'x'.join(map(str, spec.input_shape))}: "
        f"{len(spec.layers)} conv/linear layers, {len(spec.groups)} channel groups "
        f"({len(prunable)} prunable, {sum(g.channels for g in prunable)} prunable channels), "
        f"{human(spec.total_params)} parameters, {human(spec.total_macs)} MACs per sample "
        "(conv/linear)"
    )
    unused = f"\nnot run in forward (skipped): {', '.join(spec.unused)}" if spec.unused else ""
    return f"Channel groups\n{groups}\n\nLayers\n{layers}\n\n{_blocks(spec)}{totals}{unused}"


def _blocks(spec: NetworkSpec) -> str:
    """The residual blocks and whether `halp prune --remove-blocks` may remove each."""
    if not spec.blocks:
        return ""
    table = format_table(
        ["block", "inner groups", "layers", "after add", "removable / why not"],
        [[b.name, ",".join(map(str, b.groups)) or "-", len(b.layers), b.act or "-",
          "yes" if b.removable else b.reason] for b in spec.blocks],
    )
    return (f"Residual blocks ({len(spec.removable_blocks)} of {len(spec.blocks)} removable "
            f"whole by --remove-blocks)\n{table}\n\n")
