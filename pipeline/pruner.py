"""HalpPruner: latency-saliency knapsack pruning inside the user's own training loop.

Usage (any loop, any launcher)::

    pruner = HalpPruner(model, example_input, lut, target=0.5, steps=30, interval=40,
                        optimizer=optimizer)
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        pruner.step()          # accumulate saliency; every `interval` calls: one pruning step
        optimizer.step()       # masks are re-applied by the optimizer hook (or apply_masks())
        optimizer.zero_grad()
    slim_model = pruner.finalize()

Each pruning step s of ``steps`` asks the :class:`~pipeline.planner.Planner` for the
architecture within ``B_s = L0 · (Lt / L0) ** (s / steps)`` (the paper's exponential schedule
from the dense prediction L0 to the target Lt): it re-solves the knapsack, re-predicts the result
with every layer's true (cin, cout) and tightens until it fits. Dropped channels are masked
(zeroed, with zero gradients) so training goes on with the architecture the knapsack chose;
``finalize`` removes them for real.

With AMP, unscale the gradients (``scaler.unscale_(optimizer)``) before ``pruner.step()`` so
saliencies of different iterations are comparable; overflowed iterations are skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import check_removal
from .errors import HalpError
from .importance import TaylorSaliency, comm_device
from .lut import LatencyTable
from .planner import Planner, check_solver, positive_int
from .slim import MaskEntries, mask_entries, mask_plan, slim, zero_entries
from .structure import trace

STATE_FORMAT = 1

_log = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (their names lack the prefix)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _check_targets(target: float | None, target_ms: float | None) -> None:
    """Exactly one of a dense fraction in (0, 1] or a positive number of milliseconds."""
    if (target is None) == (target_ms is None):
        raise HalpError("give exactly one of target= (fraction of the dense latency) or "
                        "target_ms= (milliseconds)")
    if target is not None and not 0 < target <= 1:
        raise HalpError(f"target={target} must be a fraction in (0, 1]; use target_ms= for "
                        "milliseconds")
    if target_ms is not None and not target_ms > 0:
        raise HalpError(f"target_ms={target_ms} must be a positive number of milliseconds")


class HalpPruner:
    """Hardware-aware latency pruning (HALP) driven by ``step()`` calls from a training loop.

    ``target`` is a fraction of the dense predicted latency (0 < target <= 1) and ``target_ms``
    an absolute budget; give exactly one. ``unit`` is channels per pruning unit (an int, or
    {group id: int} over the default: the LUT's grid step, else 8). The stem (first layer run
    on the input) and the classifier output are never pruned; ``ignore`` names more layers to
    leave alone. ``solver`` is the planner's knapsack (:data:`~pipeline.config.SOLVERS`;
    default ``"coupled"``: every layer at its true (cin, cout)). Every decision comes from
    :attr:`planner` (a model-free :class:`~pipeline.planner.Planner`); the pruner keeps
    saliency, masks and the schedule. ``block_removal`` lets the coupled solver remove whole
    residual blocks (:class:`~pipeline.planner.Planner`; off by default): a removed block is
    masked to the identity and slimmed to ``nn.Identity``.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        lut: LatencyTable,
        *,
        target: float | None = None,
        target_ms: float | None = None,
        steps: int = 30,
        interval: int = 40,
        unit: int | Mapping[int, int] | None = None,
        solver: str = "coupled",
        block_removal: bool = False,
        ignore: Iterable[str | nn.Module] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        log: Callable[[str], Any] = _log.info,
    ):
        _check_targets(target, target_ms)
        self.steps, self.interval = positive_int("steps", steps), positive_int("interval", interval)
        self.solver = check_solver(solver)
        check_removal(solver, block_removal)
        self.model = _unwrap(model)
        self.example_input, self.lut, self._log = example_input, lut, log
        analysis = trace(self.model, example_input, ignore=ignore, ignore_stem=True)
        self.spec, self._dg = analysis.spec, analysis.graph
        self.planner = Planner(self.spec, lut, unit, block_removal=block_removal)
        for gid, partial in self.planner.unsized.items():
            log(f"HALP leaves group {gid} dense: layers {partial} hold only part of its channels "
                "(concatenation/split), which the latency model cannot size")
        self._target_ms = self.planner.check_target(
            self.planner.dense_ms * target if target is not None else float(target_ms))
        self._budgets = self.planner.schedule(self._target_ms, steps)
        self._saliency = TaylorSaliency(self.model, self.spec, self.planner.groups)
        self._calls = self._step = 0
        self._predicted = self.planner.dense_ms
        self._history: list[dict[str, float]] = []
        self._keep = {g: np.arange(self.spec.group(g).channels) for g in self.planner.groups}
        self._entries: MaskEntries = []
        self._grad_masks: dict[nn.Parameter, list[tuple[int, torch.Tensor]]] = {}
        if optimizer is not None:
            optimizer.register_step_post_hook(lambda *_: self.apply_masks())

    # -- public state ------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._step >= self.steps

    @property
    def counts(self) -> dict[int, int]:
        """Kept channels per prunable group."""
        return {g: len(k) for g, k in self._keep.items()}

    @property
    def keep(self) -> dict[int, list[int]]:
        """Kept channel indices per prunable group (sorted)."""
        return {g: k.tolist() for g, k in self._keep.items()}

    @property
    def predicted_ms(self) -> float:
        return self._predicted

    @property
    def dense_ms(self) -> float:
        return self.planner.dense_ms

    @property
    def target_ms(self) -> float:
        return self._target_ms

    @property
    def budgets(self) -> list[float]:
        return list(self._budgets)

    @property
    def history(self) -> list[dict[str, float]]:
        """One record per pruning step: step, budget_ms, predicted_ms, kept, total."""
        return list(self._history)

    @property
    def skipped(self) -> int:
        """Iterations whose saliency was not finite (not accumulated)."""
        return self._saliency.skipped

    # -- training-loop hooks -----------------------------------------------------------------

    def step(self) -> None:
        """Accumulate this iteration's saliency; prune when the schedule says so.

        Call after ``loss.backward()`` and before ``optimizer.step()``. A due pruning step
        waits while no finite saliency has been accumulated since the last one.
        """
        if self.done:
            return
        self._saliency.accumulate()
        self._calls += 1
        if self._calls >= (self._step + 1) * self.interval:
            self._prune()

    def apply_masks(self) -> None:
        """Zero the dropped channels' parameters (and gradients); call after optimizer.step()."""
        zero_entries(self._entries)

    def finalize(self) -> nn.Module:
        """A physically slimmed copy of the model (checked equal to the masked model)."""
        if not self.done:
            self._log(f"HALP finalize after {self._step}/{self.steps} pruning steps: the "
                      f"network is at {self._predicted:.4g} ms, not yet the target "
                      f"{self._target_ms:.4g} ms")
        x = self.example_input.to(next(self.model.parameters()).device)
        return slim(self.model, x, self.keep, spec=self.spec)

    # -- one pruning step --------------------------------------------------------------------

    def _prune(self) -> None:
        mean, n = self._saliency.average()
        if n == 0:
            self._log(f"HALP step {self._step + 1}/{self.steps} postponed: no finite saliency "
                      "since the last step")
            return
        self._saliency.reset()
        budget = self._budgets[self._step]
        plan = self.planner.solve({g: mean[g].numpy() for g in self.planner.groups}, budget,
                                  keep=self._keep, solver=self.solver)
        if plan.method == "unchanged":
            self._log(f"HALP step {self._step + 1}/{self.steps}: no smaller network fits "
                      f"{budget:.4g} ms in this LUT; keeping the current channels")
        self._set_keep(self._broadcast(plan.keep))
        self._step += 1
        self._predicted = self.planner.predict(self.counts)
        kept = sum(self.counts.values())
        total = sum(self.spec.group(g).channels for g in self.planner.groups)
        self._history.append({"step": self._step, "budget_ms": budget,
                              "predicted_ms": self._predicted, "kept": kept, "total": total})
        removed = f", blocks removed {', '.join(plan.removed)}" if plan.removed else ""
        if not _distributed() or dist.get_rank() == 0:
            self._log(f"HALP step {self._step}/{self.steps}: budget {budget:.4g} ms, predicted "
                      f"{self._predicted:.4g} ms (dense {self.dense_ms:.4g}, target "
                      f"{self._target_ms:.4g}), channels kept {kept}/{total}{removed}")

    # -- masks -------------------------------------------------------------------------------

    def _broadcast(self, keep: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Rank 0's kept channels on every rank (they already agree; this makes it certain)."""
        if not _distributed():
            return keep
        sizes = [self.spec.group(g).channels for g in self.planner.groups]
        flat = torch.zeros(sum(sizes), dtype=torch.int32)
        for offset, g in zip(np.cumsum([0, *sizes[:-1]]), self.planner.groups, strict=True):
            flat[torch.as_tensor(offset + keep[g])] = 1
        flat = flat.to(comm_device())
        dist.broadcast(flat, src=0)
        parts = torch.split(flat.cpu(), sizes)
        return {g: torch.nonzero(p).flatten().numpy() for g, p in zip(self.planner.groups, parts,
                                                                        strict=True)}

    def _set_keep(self, keep: Mapping[int, np.ndarray]) -> None:
        """Adopt new kept channels: rebuild the masks, gradient hooks, and apply them."""
        self._keep = {g: np.asarray(keep[g], dtype=np.int64) for g in self.planner.groups}
        drop = {g: np.setdiff1d(np.arange(self.spec.group(g).channels), k).tolist()
                for g, k in self._keep.items()}
        self._entries = mask_entries(self.model, mask_plan(self._dg, self.spec, drop))
        for ops in self._grad_masks.values():
            ops.clear()
        for param, dim, idx in self._entries:
            if not param.requires_grad:  # a frozen norm's buffers: zeroed once, never trained
                continue
            if param not in self._grad_masks:
                self._grad_masks[param] = []
                param.register_hook(_grad_hook(self._grad_masks[param]))
            self._grad_masks[param].append((dim, idx))
        self.apply_masks()

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue the schedule exactly."""
        return {
            "format": STATE_FORMAT, "calls": self._calls, "step": self._step,
            "steps": self.steps, "interval": self.interval, "budgets": list(self._budgets),
            "dense_ms": self.dense_ms, "target_ms": self._target_ms,
            "predicted_ms": self._predicted, "units": dict(self.planner.units),
            "keep": self.keep, "history": self.history,
            "saliency": self._saliency.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved schedule position, saliency and masks (masks applied at once)."""
        if state.get("format") != STATE_FORMAT:
            raise HalpError(f"pruner state format {state.get('format')!r} is not "
                            f"{STATE_FORMAT}; it was saved by another version")
        if {int(g): u for g, u in state["units"].items()} != self.planner.units:
            raise HalpError("the saved pruner state is for other channel groups or units; "
                            "resume with the same model, input shape, ignore= and unit=")
        saved = {"target": float(state["target_ms"]), "dense": float(state["dense_ms"])}
        for what, mine, theirs in (("target", self._target_ms, saved["target"]),
                                   ("dense prediction", self.dense_ms, saved["dense"])):
            if not math.isclose(mine, theirs, rel_tol=1e-9):
                # resuming would silently keep the other run's budget or latency table
                raise HalpError(
                    f"the saved pruner state has {what} {theirs:.6g} ms, this pruner "
                    f"{mine:.6g} ms: it was pruned with another target or latency table; "
                    "resume with the same ones"
                )
        self._saliency.load_state_dict(state["saliency"])
        self._calls, self._step = int(state["calls"]), int(state["step"])
        self.steps, self.interval = int(state["steps"]), int(state["interval"])
        self._budgets = [float(b) for b in state["budgets"]]
        self._target_ms = float(state["target_ms"])
        self._predicted = float(state["predicted_ms"])
        self._history = [dict(h) for h in state["history"]]
        self._set_keep({int(g): np.asarray(k, dtype=np.int64) for g, k in state["keep"].items()})


def _grad_hook(ops: list[tuple[int, torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Tensor hook zeroing the masked entries of a gradient before it is accumulated."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        for dim, idx in ops:
            grad = grad.index_fill(dim, idx.to(grad.device), 0)
        return grad
    return hook
