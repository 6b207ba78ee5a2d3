"""``halp lut``: build, inspect, plot and merge latency lookup tables."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import numpy as np

from ..backends.device import channel_step
from ..config import PruneConfig, at_least, parse_points
from ..errors import HalpError
from ..kinds import DeviceKind
from ..plotting import save_png, subplots
from .common import (
    OUTPUT_FILE,
    POSITIVE_INT,
    READABLE_FILE,
    add_backend_args,
    add_model_args,
    backend_from_args,
    checked,
    format_table,
    model_from_args,
)

if TYPE_CHECKING:
    from ..lut import LatencyTable, LutEntry

#: grid points per channel axis and passes unless told otherwise: as `halp prune` builds
DEFAULT_MAX_POINTS = PruneConfig.lut_max_points
DEFAULT_PASSES = PruneConfig.lut_passes
#: the grid step a job is planned with unless told otherwise: a GPU's channel block, since a job
#: is for a device (a Jetson) that the workstation cannot ask
DEVICE_STEP = channel_step(DeviceKind.CUDA)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lut", help="build, show, plot or merge latency lookup tables",
                       description=__doc__)
    actions = p.add_subparsers(dest="lut_command", required=True, metavar="ACTION")

    b = actions.add_parser("build", help="measure a model's layers on a backend (resumable)",
                           description="Measure every (signature, cin, cout) point the model's "
                           "layers need on the backend and write the table; an interrupted "
                           "build resumes from its journal.")
    add_model_args(b)
    add_backend_args(b)
    _add_grid_args(b, None, "the backend's channel block, 16 on AVX-512 CPUs, else 8")
    b.add_argument("--out", required=True, type=OUTPUT_FILE,
                   help="table to write (JSON); journal beside it")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run_build)

    j = actions.add_parser("plan", help="plan a table for a device without torch (a job file)",
                           description="Write a job for `python -m pipeline.device`: every "
                           "point the model's layers need, the settings, and the calibration "
                           "references exported to ONNX beside it (<out>.refs/).")
    add_model_args(j)
    _add_grid_args(j, DEVICE_STEP, f"{DEVICE_STEP}, a GPU's; 16 for AVX-512 CPUs")
    j.add_argument("--out", required=True, type=OUTPUT_FILE, help="job to write (JSON)")
    j.set_defaults(func=run_plan)

    s = actions.add_parser("show", help="summarise a table")
    s.add_argument("file", type=READABLE_FILE)
    s.set_defaults(func=run_show)

    pl = actions.add_parser("plot", help="latency vs output channels (the staircase) as PNG")
    pl.add_argument("file", type=READABLE_FILE)
    pl.add_argument("--layer", default=None,
                    help="signature or layer name (default: the entry with the most points)")
    pl.add_argument("-o", "--out", required=True, type=OUTPUT_FILE, help="PNG to write")
    pl.set_defaults(func=run_plot)

    m = actions.add_parser("merge", help="merge shards measured on devices of the same kind")
    m.add_argument("parts", nargs="+", type=READABLE_FILE, metavar="PART",
                   help="tables or shards (at least two)")
    m.add_argument("--job", type=READABLE_FILE, default=None,
                   help="the job the shards were measured from: the merged table is checked "
                        "against its network and calibrated on the references a shard measured")
    m.add_argument("-o", "--out", required=True, type=OUTPUT_FILE)
    m.set_defaults(func=run_merge)


def _add_grid_args(parser: argparse.ArgumentParser, step: int | None, step_default: str) -> None:
    """--step, --max-points and --passes: what a table measures, as `halp lut build` and
    `halp lut plan` both take it."""
    parser.add_argument("--step", type=POSITIVE_INT, default=step,
                        help=f"channel grid step for prunable sides (default: {step_default}); "
                             "also the pruning unit")
    parser.add_argument("--max-points", type=checked(parse_points, at_least(2)),
                        default=DEFAULT_MAX_POINTS,
                        help="at most this many grid points per channel axis (default "
                             f"{DEFAULT_MAX_POINTS}; 'all': every multiple of the step, slower)")
    parser.add_argument("--passes", type=POSITIVE_INT, default=DEFAULT_PASSES,
                        help="measure every point this many times, in separately shuffled "
                             "passes, combined by the timing protocol (fastest on CPU, median on "
                             f"GPU); default {DEFAULT_PASSES}: a shared or throttling machine has "
                             "slow spells of seconds, and one pass leaves points measured in them")


def run_build(args: argparse.Namespace) -> int:
    from ..lut import build_lut, journal_path
    from ..structure import analyze

    backend = backend_from_args(args)
    model, x = model_from_args(args)
    spec = analyze(model, x, name=args.model)
    try:
        table = build_lut(spec, backend, step=args.step, max_points=args.max_points,
                          out=args.out, model=model, example_input=x,
                          progress=not args.no_progress, passes=args.passes)
    except KeyboardInterrupt:
        print(f"progress is kept in {journal_path(args.out)}: rerun the same command to resume",
              file=sys.stderr)
        raise
    print(render(table))
    print(f"\nwrote {args.out}")
    return 0


def _load(path: str) -> LatencyTable:
    from ..lut import LatencyTable

    return LatencyTable.load(path)


def run_show(args: argparse.Namespace) -> int:
    print(render(_load(args.file)))
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from ..lut.build import plan_job
    from ..structure import analyze

    model, x = model_from_args(args)
    job = plan_job(analyze(model, x, name=args.model), model, x, step=args.step,
                   max_points=args.max_points, passes=args.passes, out=args.out)
    points = sum(len(e.points) for e in job.entries.values())
    print(f"{points} points of {len(job.entries)} signatures, {len(job.references)} reference "
          f"networks in {args.out}.refs/; on the device (numpy, onnx and the runtime; no torch):"
          f"\n  python -m pipeline.device {args.out} --backend tensorrt --precision fp16 "
          "--out part.json")
    print(f"\nwrote {args.out}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    if len(args.parts) < 2:
        raise HalpError("merge needs at least two tables or shards")
    merged = _load(args.parts[0])
    for part in args.parts[1:]:
        merged = merged.merge(_load(part))
    if args.job:
        from ..lut.job import Job
        from ..lut.measure import calibrate

        job = Job.load(args.job)
        merged.check_spec(job.spec)
        if not merged.meta.get("references"):
            raise HalpError("no part holds the calibration references (shard 1 of n measures "
                            "them); measure shard 1 too, then merge again")
        calibrate(merged, job.spec)
    merged.save(args.out)
    print(render(merged))
    print(f"\nwrote {args.out}")
    return 0


def render(table: LatencyTable) -> str:
    """Metadata, one row per signature (points, channel ranges, latency range), totals."""
    meta = table.meta
    shape = "x".join(map(str, meta.get("input_shape") or [])) or "?"
    header = [
        f"backend {meta['backend']} {meta['precision']} on {meta.get('device')} "
        f"(device_key {meta['device_key']}, threads {meta.get('threads')}, "
        f"batch {meta.get('batch')})",
        f"versions {meta.get('versions')}",
        f"settings {meta.get('settings')}",
        f"built for {meta.get('model')} @ {shape}, step {meta.get('step')}, max points "
        f"{meta.get('max_points')}, created {meta.get('created')}, build {meta.get('build_s')} s",
    ]
    if meta.get("merged_from"):
        header.append(f"merged from {len(meta['merged_from'])} shards")
    rows = []
    for sig, entry in table.entries.items():
        keys = np.array(list(entry.points))
        ms = [m.ms for m in entry.points.values()]
        rows.append([sig, len(entry.layers), len(entry.points),
                     _span(keys[:, 0]), _span(keys[:, 1]), min(ms), max(ms)])
    body = format_table(["signature", "layers", "points", "cin", "cout", "min ms", "max ms"],
                        rows)
    npoints = sum(len(e.points) for e in table.entries.values())
    dense = f"{table.dense_ms:.3f} ms" if table.dense_ms is not None else "not measured"
    const = f"{table.constant_ms:.3f} ms" if table.constant_ms is not None else "none"
    totals = (f"{len(table.entries)} signatures, {npoints} points; dense network {dense}, "
              f"calibration scale {table.scale:.3g}, constant {const}")
    return "\n".join([*header, "", body, "", totals, *_check_lines(table)])


def _check_lines(table: LatencyTable) -> list[str]:
    """How well the raw entries explain the measured networks, loudly when they do not, and
    the entries that weigh most in the dense network (where to look first)."""
    check = table.meta.get("check")
    if not check:
        return []
    lines = [f"check: raw entries sum to {100 * check['additivity']:.1f}% of the measured dense "
             f"network; fit scale {check['scale']:.3g}, constant {check['constant_ms']:+.3g} ms"]
    lines += [f"WARNING: {text}" for text in check["warnings"]]
    refs = table.meta.get("calibration") or {}
    if refs:
        lines.append("references (raw Σ entries / measured): " + ", ".join(
            f"{name} {ref['lut_ms']:.4g}/{ref['measured_ms']:.4g} ms "
            f"({ref['lut_ms'] / ref['measured_ms']:.2f})" for name, ref in refs.items()))
    weight = {sig: max(m.ms for m in e.points.values()) * len(e.layers)
              for sig, e in table.entries.items()}
    total = sum(weight.values()) or 1.0
    heaviest = sorted(weight, key=weight.get, reverse=True)[:5]
    lines.append("heaviest entries at full width: " + "; ".join(
        f"{sig} ({len(table.entries[sig].layers)} layers, {100 * weight[sig] / total:.0f}%)"
        for sig in heaviest))
    return lines


def _span(values: np.ndarray) -> str:
    lo, hi = int(values.min()), int(values.max())
    return str(lo) if lo == hi else f"{lo}..{hi}"


def _pick(table: LatencyTable, layer: str | None) -> tuple[str, LutEntry]:
    if layer is None:
        return max(table.entries.items(), key=lambda kv: len(kv[1].points))
    if layer in table.entries:
        return layer, table.entries[layer]
    for sig, entry in table.entries.items():
        if layer in entry.layers:
            return sig, entry
    names = [n for e in table.entries.values() for n in e.layers]
    raise HalpError(f"{layer!r} is neither a signature nor a layer name in {table.path}; "
                    f"layers include {', '.join(names[:8])} (see `halp lut show`)")


def run_plot(args: argparse.Namespace) -> int:
    table = _load(args.file)
    sig, entry = _pick(table, args.layer)
    rows: dict[int, list[tuple[int, float, float, float]]] = {}
    for (cin, cout), m in sorted(entry.points.items()):
        rows.setdefault(0 if entry.diagonal else cin, []).append(
            (cout, m.ms, m.p10_ms, m.p90_ms))
    cins = sorted(rows)
    shown = [cins[i] for i in np.unique(np.linspace(0, len(cins) - 1, min(4, len(cins)))
                                        .round().astype(int))]
    fig, ax = subplots(figsize=(8, 4.5))
    for cin in shown:
        cout, med, p10, p90 = np.array(rows[cin]).T
        label = "depthwise (cin = cout)" if entry.diagonal else f"cin = {cin}"
        ax.plot(cout, med, marker=".", label=label)
        ax.fill_between(cout, p10, p90, alpha=0.2)
    ax.set_xlabel("output channels")
    ax.set_ylabel("latency, median ms (band: p10..p90)")
    meta = table.meta
    ax.set_title(f"{sig}\n{', '.join(entry.layers[:3])}{' …' if len(entry.layers) > 3 else ''}"
                 f" — {meta['backend']} {meta['precision']} on {meta.get('device')}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, args.out, dpi=120)
    print(f"wrote {args.out} ({sig}: {len(entry.points)} points)")
    return 0
