"""The whole pipeline on a user's model: baseline, LUT, HALP fine-tuning, slim, export, engine.

``halp prune`` and ``halp demo`` both run :func:`run`; the settings are a
:class:`~pipeline.config.PruneConfig`, checked when it is made. Whatever else can be checked
without training (backend, data, schedule, model, a given table) is checked before the baseline
trains. Every long stage leaves a file behind
(baseline and fine-tuning checkpoints, the LUT and its journal), so an interrupted run resumes
where it stopped and a second run with the same settings reuses the baseline and the LUT. Each
file's name carries a digest of the settings it depends on, so a run with, say, another target
reuses the baseline and the table but fine-tunes afresh rather than resuming the other run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import engine
from .backends import Backend, Measurement, engine_builders, get_backend_taking
from .backends.device import slug
from .backends.timing import interleaved
from .config import PruneConfig
from .data import DataBundle, load_data
from .detection.core import DetectorCore, input_size, with_core
from .detection.data import load_detection_data
from .detection.task import DETECTION
from .errors import HalpError, InfeasibleBudget, LutMismatch
from .export import to_onnx
from .fsio import atomic_write_json
from .lut import LatencyTable, build_lut, journal_path
from .models import load_checkpoint, load_detector, load_model
from .plotting import save_png, subplots
from .pruner import HalpPruner
from .spec import NetworkSpec
from .structure import analyze
from .train import CLASSIFICATION, Task, fit

#: with ``relax_target``, an infeasible target becomes this multiple of the smallest network
#: the table predicts (all the way down, pruning would leave one unit per group)
RELAXED_MARGIN = 1.15


#: the stages of :func:`run`, also used by the peer comparison (tools/bench_peers.py) so that
#: every method gets HALP's baseline, table, schedule and engine path
__all__ = ["Job", "PruneConfig", "export_and_build", "halp_finetune", "latency_table",
           "load_job", "measure_pair", "prune_interval", "run", "train_baseline"]


@dataclass
class Summary:
    params: int
    macs: int
    predicted_ms: float
    measured_ms: float
    scores: dict[str, float]  # the task's: top1, or map50 and map

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        scores = fields.pop("scores")
        return {**fields, **scores}


@dataclass(frozen=True)
class Job:
    """What a run trains and what HALP prunes and ships: the same model for a classifier; for
    a detector the whole detector (its losses, its post-processing for mAP) and its deployable
    core, which shares the detector's parameters."""

    data: DataBundle
    task: Task
    trainable: nn.Module
    network: nn.Module

    def rejoin(self, network: nn.Module) -> nn.Module:
        """The trainable model around a (slimmed) copy of the network."""
        if self.network is self.trainable:
            return network
        return with_core(self.trainable, network)


def load_job(cfg: PruneConfig, *, split_seed: int | None = None) -> Job:
    """Data, task and models of ``cfg.task``; bad data or models fail here, before training."""
    if cfg.task == "detection":
        data = load_detection_data(cfg.data, cfg.input_shape, batch_size=cfg.batch_size,
                                   seed=cfg.seed, split_seed=split_seed)
        detector = load_detector(cfg.model, num_classes=data.num_classes)
        size = input_size(detector)
        if size is not None and tuple(cfg.input_shape[2:]) != size:
            raise HalpError(f"{cfg.model} resizes its images to {size[0]}x{size[1]}, so its "
                            f"engine takes that size: give --input "
                            f"{cfg.input_shape[0]}x{cfg.input_shape[1]}x{size[0]}x{size[1]}")
        return Job(data, DETECTION, detector, DetectorCore(detector))
    data = load_data(cfg.data, cfg.input_shape, batch_size=cfg.batch_size, seed=cfg.seed,
                     split_seed=split_seed)
    model = load_model(cfg.model, num_classes=data.num_classes)
    if isinstance(model, DetectorCore):
        raise HalpError(f"{cfg.model} is a detector: prune it with --task detection and "
                        "detection data (--data scenes or coco:PATH)")
    return Job(data, CLASSIFICATION, model, model)


def run(cfg: PruneConfig, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the pipeline; returns the report also written to ``cfg.out/report.json`` (the
    command prints it). ``log`` receives the progress lines."""
    started = time.perf_counter()
    cfg = replace(cfg, train_device=cfg.train_device or _default_device())
    torch.manual_seed(cfg.seed)
    # refuse an unavailable backend, bad data, schedule, model or table before any long work
    backend = _backend(cfg)
    job = load_job(cfg)
    data, model = job.data, job.network
    interval = prune_interval(cfg, len(data.train))
    x = torch.randn(*cfg.input_shape)
    spec = analyze(model, x, name=cfg.model)  # weights do not change the structure
    given = _given_lut(cfg, backend, spec)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    log(f"[1/5] baseline {cfg.model} on {data.name}")
    train_baseline(cfg, job.trainable, data, out, log, task=job.task)
    dense_scores = job.task.scores(job.trainable, data.val, torch.device(cfg.train_device))
    job.trainable.to("cpu")

    log(f"[2/5] latency table ({backend.name} {backend.precision})")
    lut = given if given is not None else latency_table(cfg, spec, backend, model, x, log)

    log(f"[3/5] HALP pruning to {_target_text(cfg)} while fine-tuning")
    pruner = halp_finetune(cfg, model, x, lut, data, interval, out, log,
                           trainable=job.trainable, task=job.task)
    slim_model = pruner.finalize().eval()
    pruned_scores = job.task.scores(job.rejoin(slim_model), data.val,
                                    torch.device(cfg.train_device))
    slim_model.to("cpu")
    slim_spec = analyze(slim_model, x, name=cfg.model)

    log("[4/5] export and engines")
    torch.save(slim_model, out / "pruned.pt")
    dense_engine = export_and_build(model.eval(), x, backend, out, "dense")
    pruned_engine = export_and_build(slim_model, x, backend, out, "pruned")
    log("[5/5] measuring dense and pruned engines")
    dense_ms, pruned_ms = measure_pair(dense_engine, pruned_engine, backend)

    dense = _summary(model, spec, lut, dense_ms, dense_scores)
    pruned = _summary(slim_model, slim_spec, lut, pruned_ms, pruned_scores)
    report = {
        "model": cfg.model, "task": cfg.task, "data": data.name,
        "input_shape": list(cfg.input_shape),
        "target": cfg.target, "target_ms": pruner.target_ms,
        "backend": backend.name, "precision": backend.precision,
        "device": backend.describe().device, "lut": str(lut.path) if lut.path else None,
        "dense": dense.to_dict(), "pruned": pruned.to_dict(),
        "speedup_measured": dense.measured_ms / pruned.measured_ms,
        "speedup_predicted": dense.predicted_ms / pruned.predicted_ms,
        "channels": {str(g): c for g, c in pruner.counts.items()},
        "schedule": pruner.history,
        "engines": {"dense": str(dense_engine.path), "pruned": str(pruned_engine.path)},
        "measurements": {"dense": dense_ms.to_dict(), "pruned": pruned_ms.to_dict()},
        "config": json.loads(json.dumps(asdict(cfg), default=str)),  # as it reads back
        "wall_seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / "report.json", report)
    _plot(lut, spec, slim_spec, report, out / "latency.png")
    return report


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _given_lut(cfg: PruneConfig, backend: Backend, spec: NetworkSpec) -> LatencyTable | None:
    """The ``--lut`` table, refused before training when it does not cover the model or was
    measured for another backend, precision or device (unless that mismatch is allowed)."""
    if cfg.lut == "auto":
        return None
    table = LatencyTable.load(cfg.lut)
    if not cfg.allow_lut_mismatch:
        table.check_backend(backend.describe())
    table.check_spec(spec)
    return table


def _summary(model: nn.Module, spec: NetworkSpec, lut: LatencyTable, measured: Measurement,
             scores: dict[str, float]) -> Summary:
    return Summary(sum(p.numel() for p in model.parameters()), spec.total_macs,
                   lut.predict(spec), measured.ms, scores)


def _backend(cfg: PruneConfig) -> Backend:
    deployable = engine_builders()
    if cfg.backend not in deployable:  # checked before any training starts
        raise HalpError(f"halp prune deploys through an engine: use backend "
                        f"{' or '.join(deployable)} (the {cfg.backend} backend is for "
                        "LUTs and research)")
    return get_backend_taking(cfg.backend, cfg.precision, threads=cfg.threads)


def _target_text(cfg: PruneConfig) -> str:
    if cfg.target_ms is not None:
        return f"{cfg.target_ms:g} ms"
    return f"{100 * (cfg.target or 0):g}% of the dense latency"


#: the settings a checkpoint depends on, in its file name: a run with other settings trains
#: afresh instead of resuming a checkpoint that belongs to another configuration
BASELINE_SETTINGS = ("model", "task", "data", "input_shape", "baseline_epochs", "lr",
                     "batch_size", "seed")
FINETUNE_SETTINGS = (*BASELINE_SETTINGS, "checkpoint", "target", "target_ms", "epochs", "steps",
                     "prune_span", "solver", "block_removal", "finetune_lr")


def _settings_key(cfg: PruneConfig, names: tuple[str, ...],
                  lut: LatencyTable | None = None) -> str:
    """A short stable digest of ``cfg``'s named settings (and the table's identity)."""
    fields = {name: getattr(cfg, name) for name in names}
    if lut is not None:
        fields["lut"] = {k: lut.meta.get(k) for k in ("device_key", "created", "points")}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def train_baseline(cfg: PruneConfig, model: nn.Module, data: Any, out: Path,
                   log: Callable[[str], Any], *, task: Task = CLASSIFICATION) -> None:
    """Load the user's trained weights into ``model``, or train it here (resumable, reused when
    cached)."""
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
        return
    ckpt = out / f"baseline-{_settings_key(cfg, BASELINE_SETTINGS)}.ckpt"
    fit(model, data.train, epochs=cfg.baseline_epochs, lr=cfg.lr, device=cfg.train_device,
        val_loader=data.val, checkpoint=ckpt, resume=True, desc="baseline", task=task,
        log=log)


def latency_table(cfg: PruneConfig, spec: NetworkSpec, backend: Backend, model: nn.Module,
                  x: torch.Tensor, log: Callable[[str], Any]) -> LatencyTable:
    """The table ``--lut auto`` builds, or reuses from the cache when built the same way."""
    desc = backend.describe()
    shape = "x".join(map(str, cfg.input_shape))
    step = cfg.lut_step or backend.default_step
    # every build setting in the name: a cached table is reused only for the same build
    path = Path(cfg.lut_cache) / (f"{slug(cfg.model)}-{shape}-{desc.backend}-"
                                  f"{desc.precision}-{desc.device_key}-s{step}"
                                  f"-p{cfg.lut_max_points or 'all'}-x{cfg.lut_passes}.json")
    log(f"LUT cache: {path}" + (" (reused)" if path.is_file() else " (building)"))
    build = partial(build_lut, spec, backend, step=step, max_points=cfg.lut_max_points,
                    out=path, model=model, example_input=x, passes=cfg.lut_passes)
    try:
        return build()
    except LutMismatch as exc:  # a cached table or journal measured another way (an older
        # version's protocol): a cache entry is rebuilt, never an error
        log(f"{exc}\nLUT cache: measured another way; rebuilding {path}")
        path.unlink(missing_ok=True)
        journal_path(path).unlink(missing_ok=True)
        return build()


def prune_interval(cfg: PruneConfig, batches: int) -> int:
    """Fine-tuning iterations between pruning steps, so that all steps end within the first
    ``cfg.prune_span`` of them."""
    iterations = cfg.epochs * batches
    interval = max(1, int(cfg.prune_span * iterations) // cfg.steps)
    if interval * cfg.steps > iterations:
        raise HalpError(f"{cfg.steps} pruning steps do not fit in {iterations} fine-tuning "
                        "iterations; raise --epochs or lower --steps")
    return interval


def halp_finetune(cfg: PruneConfig, model: nn.Module, x: torch.Tensor, lut: LatencyTable,
                  data: Any, interval: int, out: Path, log: Callable[[str], Any], *,
                  trainable: nn.Module | None = None, task: Task = CLASSIFICATION
                  ) -> HalpPruner:
    """Fine-tune ``model`` while HALP prunes it to the target (resumable from ``out``); a
    ``trainable`` model around it (a detector around its core) is what trains, on ``task``."""
    def pruner_for(target: float | None, target_ms: float | None) -> HalpPruner:
        return HalpPruner(model, x, lut, target=None if target_ms else target,
                          target_ms=target_ms, steps=cfg.steps, interval=interval,
                          solver=cfg.solver, block_removal=cfg.block_removal, log=log)

    try:
        pruner = pruner_for(cfg.target, cfg.target_ms)
    except InfeasibleBudget as exc:
        if not cfg.relax_target:
            raise
        relaxed = RELAXED_MARGIN * exc.minimum
        log(f"{exc}.\nOn this machine the table cannot reach {_target_text(cfg)}: pruning to "
            f"{relaxed:.4g} ms instead, {RELAXED_MARGIN:g}x the smallest network it predicts")
        pruner = pruner_for(None, relaxed)
    log(f"dense predicted {pruner.dense_ms:.4g} ms → target {pruner.target_ms:.4g} ms; "
        f"{cfg.steps} steps every {interval} iterations")
    ckpt = out / f"finetune-{_settings_key(cfg, FINETUNE_SETTINGS, lut)}.ckpt"
    trainable = model if trainable is None else trainable
    fit(trainable, data.train, epochs=cfg.epochs, lr=cfg.finetune_lr, device=cfg.train_device,
        val_loader=data.val, checkpoint=ckpt, resume=True,
        after_backward=pruner.step, after_step=pruner.apply_masks, state={"pruner": pruner},
        desc="halp", task=task, log=log)
    trainable.to("cpu")
    return pruner


def export_and_build(model: nn.Module, x: torch.Tensor, backend: Backend, out: Path,
                     name: str) -> engine.Engine:
    """``model`` exported to ``out/<name>.onnx`` (checked against torch) and built into the
    backend's engine."""
    onnx_path = out / f"{name}.onnx"
    to_onnx(model, x, onnx_path)  # checked against torch: a mismatch stops the run here
    return engine.build(onnx_path, backend, out, name=name)


def measure_pair(dense: engine.Engine, pruned: engine.Engine,
                 backend: Backend) -> tuple[Measurement, Measurement]:
    """Alternate dense and pruned rounds so drift (clocks, other load) hits both alike."""
    pair = interleaved([engine.timer(dense, backend), engine.timer(pruned, backend)])
    return pair[0], pair[1]


def _plot(lut: LatencyTable, dense: NetworkSpec, pruned: NetworkSpec, report: dict[str, Any],
          path: Path) -> None:
    """Per-layer LUT latency, dense vs pruned, with the measured totals in the title."""
    before = lut.layer_latencies(dense)
    after = lut.layer_latencies(pruned)
    names = list(before)
    fig, ax = subplots(figsize=(max(6, 0.28 * len(names)), 4), dpi=110)
    idx = range(len(names))
    ax.bar([i - 0.2 for i in idx], [before[n] for n in names], 0.4, label="dense")
    ax.bar([i + 0.2 for i in idx], [after.get(n, 0.0) for n in names], 0.4, label="pruned")
    ax.set_xticks(list(idx), names, rotation=90, fontsize=6)
    ax.set_ylabel("LUT latency (ms)")
    d, p = report["dense"], report["pruned"]
    ax.set_title(f"{report['model']}: measured {d['measured_ms']:.3g} → {p['measured_ms']:.3g} "
                 f"ms ({report['speedup_measured']:.2f}x; predicted "
                 f"{report['speedup_predicted']:.2f}x)", fontsize=9)
    ax.legend(fontsize=8)
    save_png(fig, path)

