"""Training, fine-tuning and evaluation loops shared by `halp prune` and `halp demo`.

The HALP pruner needs no loop of its own: it plugs in through two hooks. ``after_backward`` runs
once gradients exist and before the optimizer moves the weights (the pruner accumulates Taylor
saliency and, on schedule, solves the knapsack); ``after_step`` runs after the update (masks are
re-applied so pruned channels stay zero). A pruner that removes channels in place (Torch-Pruning,
:mod:`pipeline.peers`) returns True from ``after_backward``, and the optimizer takes the new
parameters.

What is trained is a :class:`Task`: its loss on a batch and its validation metrics. Classification
(cross-entropy, top-1) is the default; a detector brings its own losses
(:mod:`pipeline.detection.task`).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HalpError
from .fsio import atomic_write_bytes
from .progress import progress as progress_bar

CHECKPOINT_FORMAT = "halp-train-checkpoint/1"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


class Task(Protocol):
    """What the loop needs to know of a task. ``metric`` names the headline entry of
    :meth:`scores` (logged per epoch); ``loss`` returns the batch's loss and its sample count."""

    metric: str

    def loss(self, model: nn.Module, batch: Any, device: torch.device
             ) -> tuple[torch.Tensor, int]: ...

    def scores(self, model: nn.Module, loader: Iterable, device: torch.device
               ) -> dict[str, float]: ...


class Classification:
    """Cross-entropy on (images, labels) batches; scored by top-1 accuracy in percent."""

    metric = "top1"

    def loss(self, model: nn.Module, batch: Any, device: torch.device
             ) -> tuple[torch.Tensor, int]:
        images, labels = batch
        logits = model(images.to(device, non_blocking=True))
        return F.cross_entropy(logits, labels.to(device, non_blocking=True)), labels.numel()

    def scores(self, model: nn.Module, loader: Iterable, device: torch.device
               ) -> dict[str, float]:
        return {"top1": evaluate(model, loader, device)}


CLASSIFICATION = Classification()


class _Run:
    """Optimizer, per-iteration cosine schedule and AMP scaler of one ``fit`` call."""

    def __init__(self, model: nn.Module, *, iterations: int, lr: float, momentum: float,
                 weight_decay: float, device: torch.device):
        self.amp = device.type == "cuda"
        self.device = device
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, iterations)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)

    def rebind(self, model: nn.Module) -> None:
        """Optimize ``model``'s current parameters (a pruner replaced some in place): the
        schedule goes on; momentum restarts for the replaced ones."""
        params = list(model.parameters())
        live = {id(p) for p in params}
        self.optimizer.param_groups[0]["params"] = params
        for p in [p for p in self.optimizer.state if id(p) not in live]:
            del self.optimizer.state[p]

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, enabled=self.amp)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def fit(model: nn.Module, train_loader: Iterable, *, epochs: int, lr: float = 0.05,
        momentum: float = 0.9, weight_decay: float = 5e-4, device: str | torch.device = "cpu",
        val_loader: Iterable | None = None, checkpoint: str | Path | None = None,
        resume: bool = False, after_backward: Callable[[], bool | None] | None = None,
        after_step: Callable[[], Any] | None = None,
        state: Mapping[str, Stateful] | None = None, desc: str = "train",
        task: Task = CLASSIFICATION, log: Callable[[str], Any] = print) -> list[dict]:
    """Train ``model`` on ``task`` with SGD + cosine LR; returns per-epoch ``{epoch, loss,
    metric, seconds, skipped}`` (``metric``: the task's headline validation score, or None
    without ``val_loader``).

    With ``checkpoint`` a checkpoint is written atomically after every epoch; with ``resume``
    an existing one is loaded (model, optimizer, schedule, scaler, history and every ``state``
    object) and training continues at the next epoch.
    """
    if epochs < 1:
        raise HalpError(f"epochs must be >= 1, got {epochs}")
    batches = len(train_loader)
    if batches == 0:
        raise HalpError("the training loader yields no batches: the training split is empty or "
                        "smaller than one batch; add images or lower the batch size")
    device = torch.device(device)
    state = dict(state or {})
    was_training = model.training
    model.to(device)
    run = _Run(model, iterations=epochs * batches, lr=lr, momentum=momentum,
               weight_decay=weight_decay, device=device)
    history: list[dict] = []
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        history = _restore(Path(checkpoint), model, run, state, epochs=epochs, log=log)
    for epoch in range(len(history) + 1, epochs + 1):
        started = time.perf_counter()
        loss, skipped = _train_epoch(model, train_loader, run, task, epoch=epoch,
                                     epochs=epochs, desc=desc, after_backward=after_backward,
                                     after_step=after_step)
        if skipped:
            log(f"{desc} epoch {epoch}: skipped {skipped} of {batches} batches with a non-finite "
                "loss; if this recurs, lower --lr")
        metric = (task.scores(model, val_loader, device)[task.metric]
                  if val_loader is not None else None)
        history.append({"epoch": epoch, "loss": loss, "metric": metric,
                        "seconds": time.perf_counter() - started, "skipped": skipped})
        log(_summary(desc, history[-1], epochs, task.metric))
        if checkpoint is not None:
            _save(Path(checkpoint), model, run, state, history, epochs=epochs)
    model.train(was_training)
    return history


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy in percent, in eval mode; the model's train/eval mode is restored."""
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    correct = total = 0
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            for images, labels in loader:
                logits = model(images.to(device, non_blocking=True))
                correct += (logits.argmax(1).cpu() == labels).sum().item()
                total += labels.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise HalpError("the validation loader yields no images; add images to the val split")
    return 100.0 * correct / total


def _train_epoch(model: nn.Module, loader: Iterable, run: _Run, task: Task, *, epoch: int,
                 epochs: int, desc: str, after_backward: Callable[[], bool | None] | None,
                 after_step: Callable[[], Any] | None) -> tuple[float, int]:
    """One pass; returns (mean finite loss per sample, batches skipped for a non-finite loss)."""
    model.train()
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch - 1)
    loss_sum, seen, skipped = 0.0, 0, 0
    bar = progress_bar(loader, desc=f"{desc} {epoch}/{epochs}", unit="batch", leave=False)
    for batch in bar:
        with run.autocast():
            loss, samples = task.loss(model, batch, run.device)
        value = loss.item()
        if not math.isfinite(value):
            skipped += 1
            continue
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)  # hooks see true gradients, also under AMP
        if after_backward is not None and after_backward():
            run.rebind(model)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if after_step is not None:
            after_step()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        loss_sum += value * samples
        seen += samples
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)  # drawn at its pace
    if seen == 0:
        raise HalpError(f"{desc} epoch {epoch}: every batch gave a non-finite loss (NaN/inf), so "
                        f"training diverged; lower --lr (now {run.scheduler.base_lrs[0]:g}, try "
                        f"{run.scheduler.base_lrs[0] / 10:g}) or check the input normalisation")
    return loss_sum / seen, skipped


def _summary(desc: str, record: dict, epochs: int, metric: str) -> str:
    value = "-" if record["metric"] is None else f"{record['metric']:.2f}%"
    return (f"{desc} epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, "
            f"val {metric} {value}, {record['seconds']:.1f} s")


def _save(path: Path, model: nn.Module, run: _Run, state: Mapping[str, Stateful],
          history: list[dict], *, epochs: int) -> None:
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": len(history), "epochs": epochs,
                "model": model.state_dict(), **run.state_dict(), "history": history,
                "state": {name: obj.state_dict() for name, obj in state.items()}}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _restore(path: Path, model: nn.Module, run: _Run, state: Mapping[str, Stateful], *,
             epochs: int, log: Callable[[str], Any]) -> list[dict]:
    """Load a checkpoint written by :func:`fit`; returns the history of the finished epochs."""
    fresh = f"delete {path} to start over"
    try:
        # Our own file; full unpickling because `state` objects may hold non-tensor values.
        saved = torch.load(path, map_location=run.device, weights_only=False)
    except Exception as exc:
        raise HalpError(f"checkpoint {path} is unreadable ({exc}); {fresh}") from exc
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise HalpError(f"{path} is not a training checkpoint written by halp; {fresh}")
    if saved["epochs"] != epochs:
        raise HalpError(f"checkpoint {path} belongs to a {saved['epochs']}-epoch run, not "
                        f"{epochs}: resume with --epochs {saved['epochs']} or {fresh}")
    missing = sorted(set(state) - set(saved["state"]))
    if missing:
        raise HalpError(f"checkpoint {path} has no saved state for {missing} (it was written by "
                        f"another kind of run); {fresh}")
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as exc:
        raise HalpError(f"checkpoint {path} does not fit this model "
                        f"({str(exc).splitlines()[0]}); {fresh}") from exc
    run.load_state_dict(saved)
    for name, obj in state.items():
        try:
            obj.load_state_dict(saved["state"][name])
        except HalpError as exc:
            raise HalpError(f"checkpoint {path}: {exc}; or {fresh}") from exc
    log(f"resumed from {path} after epoch {saved['epoch']}/{epochs}")
    return list(saved["history"])
