"""Benchmark: HALP against what a user would pick instead, at equal measured latency (issue 12).

One baseline is trained and one latency table built (both cached in ``--out``). Then for each
target (a fraction of the dense predicted latency) and seed, five networks are cut from that
baseline and fine-tuned on the same schedule (``--epochs``, ``--steps`` spread over the first
``--prune-span`` of the iterations, the same learning rate and data order):

- ``halp``: this project's pruner with the table, as `halp prune` runs it;
- ``halp-arch``: HALP's final architecture (the channels it kept) cut from the baseline at once
  and fine-tuned for the whole schedule, as ``uniform`` is: it tells HALP's choice of
  architecture apart from its schedule (pruning takes the first ``--prune-span`` of the
  fine-tuning);
- ``tp-latency``: Torch-Pruning's ``BasePruner`` with group Taylor importance, global pruning,
  ``round_to`` = the table's step, its ratio searched so that its measured latency matches
  HALP's within ``--tolerance`` (bisection on the table's prediction of a one-shot pruning,
  then a corrected search after each fine-tuned, measured try, at most ``--tries``);
- ``tp-macs``: the same pruner stopped at HALP's MACs;
- ``uniform``: every prunable group at one width factor (L1-norm channel choice), matched to
  HALP's measured latency like ``tp-latency``.

Every network but HALP's own is fine-tuned from the baseline by the same loop and seed. Every
network is exported and built as `halp engine` builds it and measured with the backend's
protocol, the five and the dense one in interleaved rounds. The torch backend (``--backend torch
--device cuda``: cuDNN, CUDA graphs, CUDA events), which has no engine format, times the
BatchNorm-folded modules themselves. Each finished (target, seed) is
appended to ``OUT/results.jsonl``: an interrupted run resumes at the next one. The table
(mean and spread over seeds) and ``OUT/peers.png`` (top-1 vs measured latency) are made from
that file.

    .venv/bin/python tools/bench_peers.py                       # 6 targets x 3 seeds, ~35 min
    .venv/bin/python tools/bench_peers.py --quick --out /tmp/q  # 1 target, 1 seed (CI test)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import engine
from pipeline.backends import BACKENDS, EngineBuilder, get_backend_taking
from pipeline.backends.timing import ROUNDS, Measurement, interleaved
from pipeline.config import PruneConfig, parse_shape
from pipeline.data import load_data
from pipeline.fsio import append_journal, atomic_write_json, read_journal
from pipeline.lut import LatencyTable
from pipeline.models import load_model
from pipeline.peers import (
    TorchPruningSchedule,
    macs,
    predicted_ms,
    solve_decreasing,
    taylor_oneshot,
    uniform_counts,
    uniform_model,
)
from pipeline.planner import Planner
from pipeline.plotting import save_png, subplots
from pipeline.prune import (
    export_and_build,
    halp_finetune,
    latency_table,
    prune_interval,
    train_baseline,
)
from pipeline.slim import slim
from pipeline.spec import NetworkSpec
from pipeline.structure import analyze, trace
from pipeline.train import evaluate, fit

METHODS = ("halp", "halp-arch", "tp-latency", "tp-macs", "uniform")
#: one network, loaded once: each call times it again
Timer = Callable[[], Measurement]
#: batches whose gradients rank channels for the one-shot pruning the ratio search uses
SEARCH_BATCHES = 4


@dataclass
class Bench:
    """Everything one (target, seed) needs: the settings, the baseline, table and backend."""

    cfg: PruneConfig
    tolerance: float
    tries: int
    baseline: nn.Module
    lut: LatencyTable
    backend: Any
    x: torch.Tensor
    out: Path
    #: HALP's view of the baseline (its stem left dense), traced once
    spec: NetworkSpec = field(init=False)

    def __post_init__(self) -> None:
        self.spec = trace(self.baseline, self.x, ignore_stem=True).spec

    def built(self, model: nn.Module, name: str) -> Timer:
        """``model`` as the backend deploys it, loaded once: its engine (``OUT/<name>``), or on
        the torch backend the folded module."""
        if isinstance(self.backend, EngineBuilder):
            built = export_and_build(model.eval(), self.x, self.backend, self.out, name)
            return engine.timer(built, self.backend)
        return self.backend.module_timer(model.eval(), self.x)

    def measure(self, *timers: Timer) -> list[float]:
        """Milliseconds of each network, in interleaved rounds (three times verify's: the match
        is judged on differences of a few percent, and these networks run in tenths of a ms)."""
        return [m.ms for m in interleaved(list(timers), rounds=3 * ROUNDS)]

    def finetune(self, model: nn.Module, data: Any, seed: int, desc: str,
                 after_backward: Callable[[], bool | None] | None = None) -> nn.Module:
        torch.manual_seed(seed)
        fit(model, data.train, epochs=self.cfg.epochs, lr=self.cfg.finetune_lr,
            device=self.cfg.train_device, after_backward=after_backward, desc=desc,
            log=lambda _: None)
        return model.to("cpu").eval()


def result(bench: Bench, model: nn.Module, data: Any, method: str, knob: float,
           tries: int) -> dict[str, Any]:
    """One network's report fields but its measurement (taken with the others')."""
    spec = analyze(model, bench.x)
    return {"method": method, "predicted_ms": bench.lut.predict(spec), "macs": spec.total_macs,
            "params": sum(p.numel() for p in model.parameters()),
            "top1": evaluate(model, data.val, bench.cfg.train_device), "knob": knob,
            "tries": tries}


def matched(bench: Bench, name: str, goal: float, search: Callable[[float], float],
            train: Callable[[float], nn.Module], size: Callable[[nn.Module], float],
            log: Callable[[str], Any]) -> tuple[nn.Module, float, int, float]:
    """Train tries until ``size`` (the quantity to match, relative to HALP's) is within the
    tolerance or the tries run out; the closest try wins. Returns (model, knob, tries, its
    size): the size as that try measured it, beside HALP's alone.

    A knob is searched for ``goal`` in the units ``search`` predicts (the table's latency, or
    MACs), the goal corrected after each try by that try's miss, since the fine-tuned size is
    not exactly the predicted one. Once tries fall on both sides of HALP's, the next knob is
    interpolated between the closest two of them in log size instead.
    """
    tries: list[tuple[float, float, nn.Module]] = []  # (log size, knob, model)
    for attempt in range(1, bench.tries + 1):
        below = [t for t in tries if t[0] < 0]
        above = [t for t in tries if t[0] > 0]
        if below and above:
            a, b = max(below, key=lambda t: t[0]), min(above, key=lambda t: t[0])
            knob = a[1] + (b[1] - a[1]) * a[0] / (a[0] - b[0])
        else:
            if tries:
                goal /= math.exp(tries[-1][0])
            knob = search(goal)
        model = train(knob)
        ratio = size(model)
        log(f"  {name} try {attempt}: knob {knob:.4f}: {ratio:.3f} of HALP")
        tries.append((math.log(ratio), knob, model))
        if abs(ratio - 1) <= bench.tolerance:
            break
    best = min(tries, key=lambda t: abs(t[0]))
    return best[2], best[1], len(tries), math.exp(best[0])


def run_group(bench: Bench, target: float, seed: int, log: Callable[[str], Any]
              ) -> list[dict[str, Any]]:
    """The five networks at one target and seed, measured with the dense one."""
    started = time.perf_counter()
    cfg = replace(bench.cfg, target=target, seed=seed)
    data = load_data(cfg.data, cfg.input_shape, batch_size=cfg.batch_size, seed=seed,
                     split_seed=bench.cfg.seed)
    spec, x, step = bench.spec, bench.x, int(bench.lut.meta["step"])
    interval = prune_interval(cfg, len(data.train))
    batches = list(islice(iter(data.train), SEARCH_BATCHES))
    tag = f"t{target:g}-s{seed}"

    torch.manual_seed(seed)
    halp_model = copy.deepcopy(bench.baseline)
    pruner = halp_finetune(cfg, halp_model, x, bench.lut, data, interval, bench.out,
                           log=lambda _: None)
    halp = pruner.finalize().eval()
    halp_timer = bench.built(halp, f"{tag}-halp")
    cut = {g: k for g, k in pruner.keep.items() if len(k) < spec.group(g).channels}
    models: dict[str, tuple[nn.Module, float, int, float]] = {
        "halp": (halp, target, 1, 1.0),
        "halp-arch": (bench.finetune(slim(bench.baseline, x, cut, spec=spec), data, seed,
                                     "halp-arch"), target, 1, 1.0)}

    def relative_ms(model: nn.Module) -> float:
        cand = bench.built(model, f"{tag}-candidate")
        ms_halp, ms = bench.measure(halp_timer, cand)
        return ms / ms_halp

    def tp(ratio: float) -> nn.Module:
        model = copy.deepcopy(bench.baseline)
        schedule = TorchPruningSchedule(model, x, spec, ratio, steps=cfg.steps,
                                        interval=interval, round_to=step)
        return bench.finetune(model, data, seed, "tp", schedule.step)

    def oneshot(ratio: float) -> nn.Module:
        return taylor_oneshot(bench.baseline, x, spec, ratio, batches, step)

    def tp_ratio(measure: Callable[[nn.Module], float]) -> Callable[[float], float]:
        return lambda goal: solve_decreasing(lambda r: measure(oneshot(r)), goal, 0.0, 0.95)

    halp_pred = predicted_ms(bench.lut, halp, x)
    models["tp-latency"] = matched(bench, "tp-latency", halp_pred,
                                   tp_ratio(lambda m: predicted_ms(bench.lut, m, x)),
                                   tp, relative_ms, log)
    halp_macs = macs(halp, x)
    models["tp-macs"] = matched(bench, "tp-macs", halp_macs, tp_ratio(lambda m: macs(m, x)), tp,
                                lambda m: macs(m, x) / halp_macs, log)
    planner = Planner(spec, bench.lut)
    # the search runs on the share of width removed, so that the prediction falls with it
    models["uniform"] = matched(
        bench, "uniform", halp_pred,
        lambda goal: 1.0 - solve_decreasing(
            lambda removed: planner.predict(uniform_counts(planner, 1.0 - removed)), goal,
            0.0, 1.0),
        lambda f: bench.finetune(uniform_model(bench.baseline, x, planner, f), data, seed,
                                 "uniform"),
        relative_ms, log)

    timers = [bench.built(bench.baseline, "dense")] + [
        halp_timer if name == "halp" else bench.built(m, f"{tag}-{name}")
        for name, (m, *_) in models.items()]
    dense_ms, *measured = bench.measure(*timers)
    rows = []
    for (name, (model, knob, tries, found)), ms in zip(models.items(), measured, strict=True):
        rows.append({"target": target, "seed": seed, "measured_ms": ms,
                     "match": ms / measured[0], "search_match": found, "dense_ms": dense_ms,
                     **result(bench, model, data, name, knob, tries),
                     "group_seconds": time.perf_counter() - started})
        log(f"  {name:10s} measured {ms:.3f} ms ({rows[-1]['match']:.3f} of HALP's), "
            f"top-1 {rows[-1]['top1']:.2f}%")
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target and method: means over seeds, and top-1's spread (sample stdev)."""
    out = []
    for target in sorted({r["target"] for r in rows}, reverse=True):
        for method in METHODS:
            runs = [r for r in rows if r["target"] == target and r["method"] == method]
            if not runs:
                continue
            top1 = [r["top1"] for r in runs]
            out.append({"target": target, "method": method, "seeds": len(runs),
                        **{k: statistics.fmean(r[k] for r in runs)
                           for k in ("measured_ms", "match", "predicted_ms", "macs", "params")},
                        "top1": statistics.fmean(top1),
                        "top1_sd": statistics.stdev(top1) if len(top1) > 1 else 0.0})
    return out


def table(summaries: list[dict[str, Any]], dense: dict[str, float]) -> str:
    head = ("target", "method", "seeds", "measured ms", "vs HALP", "predicted ms", "MACs M",
            "params M", "top-1 %")
    lines = [("dense", "-", "-", f"{dense['measured_ms']:.3f}", "-",
              f"{dense['predicted_ms']:.3f}", f"{dense['macs'] / 1e6:.1f}",
              f"{dense['params'] / 1e6:.2f}", f"{dense['top1']:.2f}")]
    for s in summaries:
        lines.append((f"{s['target']:g}", s["method"], str(s["seeds"]), f"{s['measured_ms']:.3f}",
                      f"{s['match']:.3f}", f"{s['predicted_ms']:.3f}", f"{s['macs'] / 1e6:.1f}",
                      f"{s['params'] / 1e6:.2f}", f"{s['top1']:.2f} ± {s['top1_sd']:.2f}"))
    widths = [max(len(str(r[i])) for r in (head, *lines)) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*r) for r in lines)])


def plot(summaries: list[dict[str, Any]], dense: dict[str, float], path: Path) -> None:
    """Top-1 against measured latency, one line per method (mean and spread over seeds)."""
    fig, ax = subplots(figsize=(6, 4), dpi=120)
    for method in METHODS:
        pts = sorted((s["measured_ms"], s["top1"], s["top1_sd"]) for s in summaries
                     if s["method"] == method)
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        marker="o", capsize=3, label=method)
    ax.plot([dense["measured_ms"]], [dense["top1"]], "k*", markersize=10, label="dense")
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(dense["title"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


#: what ``--quick`` changes, as defaults: a flag given explicitly still wins
QUICK = {"targets": [0.3], "seeds": 1, "baseline_epochs": 3, "epochs": 1, "steps": 4,
         "lut_passes": 1, "lut_max_points": 4, "tries": 5}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("engines/peers"))
    p.add_argument("--model", default="resnet18")
    p.add_argument("--input", default="1x3x32x32")
    p.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.45, 0.3, 0.2, 0.15, 0.12])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--backend", default="onnxruntime", choices=tuple(BACKENDS),
                   help="onnxruntime, tensorrt where it is installed, or torch (--device cuda "
                        "on a GPU: the batch is --input's first dimension)")
    p.add_argument("--device", default=None, help="the torch backend's device (cpu, cuda)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for a CPU backend")
    p.add_argument("--baseline-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prune-span", type=float, default=PruneConfig.prune_span,
                   help="share of the fine-tuning the pruning steps are spread over")
    p.add_argument("--lut-passes", type=int, default=3)
    p.add_argument("--lut-max-points", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=0.03,
                   help="measured latency match to HALP's (relative)")
    p.add_argument("--tries", type=int, default=3,
                   help="fine-tuned tries per match (--quick: 5, its fine-tuning is short)")
    p.add_argument("--quick", action="store_true",
                   help="one target (0.3), one seed, short schedules, a coarse table, 5 tries; "
                        "any of these given explicitly overrides it")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    # the backend is the bench's own (PruneConfig's are those `halp prune` deploys with)
    cfg = PruneConfig(model=args.model, data="digits",
                      input_shape=parse_shape(args.input), out=args.out,
                      baseline_epochs=args.baseline_epochs,
                      epochs=args.epochs, steps=args.steps, prune_span=args.prune_span,
                      lut_passes=args.lut_passes,
                      lut_max_points=args.lut_max_points, lut_cache=args.out / "luts",
                      relax_target=True,
                      train_device="cuda" if torch.cuda.is_available() else "cpu")
    backend = get_backend_taking(args.backend, args.precision, threads=args.threads,
                                 device=args.device)
    data = load_data(cfg.data, cfg.input_shape, batch_size=cfg.batch_size, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    x = torch.randn(*cfg.input_shape)
    baseline = load_model(cfg.model, num_classes=data.num_classes)
    print(f"baseline {cfg.model} on digits @ {args.input}")
    train_baseline(cfg, baseline, data, args.out, print)
    baseline.eval()
    lut = latency_table(cfg, analyze(baseline, x), backend, baseline, x, print)
    bench = Bench(cfg, args.tolerance, args.tries, baseline, lut, backend, x, args.out)

    journal = args.out / "results.jsonl"
    rows = list(read_journal(journal)) if journal.exists() else []
    done = {(r["target"], r["seed"]) for r in rows}
    for target in args.targets:
        for seed in range(args.seeds):
            if (target, seed) in done:
                continue
            print(f"target {target:g}, seed {seed}")
            for row in run_group(bench, target, seed, print):
                append_journal(journal, row)
                rows.append(row)
    rows = [r for r in rows if r["target"] in args.targets and r["seed"] < args.seeds]
    desc = backend.describe()
    dense = {"measured_ms": statistics.median(r["dense_ms"] for r in rows),
             "predicted_ms": lut.predict(analyze(baseline, x)), "macs": macs(baseline, x),
             "params": sum(q.numel() for q in baseline.parameters()),
             "top1": evaluate(baseline, data.val),
             "title": f"{cfg.model} on digits @ {args.input}, {args.epochs} fine-tuning epochs\n"
                      f"{backend.name} {backend.precision}, {desc.device}"
                      + (f", {desc.threads} thread(s)" if desc.threads else "")}
    summaries = summary(rows)
    print(table(summaries, dense))
    report = {"settings": {**vars(args), "out": str(args.out)}, "dense": dense,
              "summary": summaries, "runs": rows,
              "wall_seconds": time.perf_counter() - started}
    atomic_write_json(args.out / "report.json", json.loads(json.dumps(report, default=str)))
    plot(summaries, dense, args.out / "peers.png")
    print(f"wrote {args.out / 'report.json'} and {args.out / 'peers.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
