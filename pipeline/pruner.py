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

Each pruning step s of ``steps`` re-solves the knapsack under the budget
``B_s = L0 · (Lt / L0) ** (s / steps)`` (the paper's exponential schedule from the dense
prediction L0 to the target Lt), re-predicts the result with every layer's true (cin, cout) and
tightens until it fits. Dropped channels are masked (zeroed, with zero gradients) so training
goes on with the architecture the knapsack chose; ``finalize`` removes them for real.

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

from .errors import HalpError, InfeasibleBudget
from .importance import TaylorSaliency, comm_device
from .knapsack import solve
from .lut import LatencyTable
from .slim import MaskEntries, dependency_graph, mask_entries, mask_plan, slim, zero_entries
from .spec import LayerSpec, NetworkSpec
from .structure import analyze

#: channels per pruning unit when the LUT does not name its grid step: TensorRT kernels and CPU
#: SIMD process channels in blocks of 8 or 16 (FP16/INT8 tensor cores need multiples of 8), so
#: counts between blocks pay for the padding without the accuracy. By default the unit is the
#: LUT's step (the backend's channel block); override per group with ``unit=``
DEFAULT_UNIT = 8
#: re-solves with a tightened budget before the greedy fallback takes over
MAX_TIGHTEN = 12
STATE_FORMAT = 1

_log = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (their names lack the prefix)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def first_layer(model: nn.Module, example_input: torch.Tensor) -> str | None:
    """Name of the first conv/linear layer that runs on ``example_input`` (the stem)."""
    names = {m: n for n, m in model.named_modules()}
    seen: list[str] = []
    handles = [m.register_forward_pre_hook(lambda m, _args: seen.append(names[m]))
               for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen[0] if seen else None


def _units(unit: int | Mapping[int, int] | None, spec: NetworkSpec, groups: list[int], *,
           default: int = DEFAULT_UNIT) -> dict[int, int]:
    """Channels per unit for each prunable group, clipped to the group size."""
    per = dict(unit) if isinstance(unit, Mapping) else {}
    default = default if unit is None or isinstance(unit, Mapping) else unit
    unknown = sorted(set(per) - set(groups))
    if unknown:
        raise HalpError(f"unit= names groups {unknown} that are not prunable; prunable groups "
                        f"are {groups} (see `halp analyze`)")
    out = {}
    for g in groups:
        u = per.get(g, default)
        if isinstance(u, bool) or not isinstance(u, (int, np.integer)) or u < 1:
            raise HalpError(f"unit for group {g} must be a positive int of channels, got {u!r}")
        out[g] = min(int(u), spec.group(g).channels)
    return out


def _choices(channels: int, unit: int) -> np.ndarray:
    """Channel counts a group may keep, index k = units kept: 0, u, 2u, ..., and the full size
    (a partial last unit only when ``channels`` is not a multiple of ``unit``)."""
    counts = list(range(0, channels + 1, unit))
    if counts[-1] != channels:
        counts.append(channels)
    return np.array(counts, dtype=np.int64)


def _rank(saliency: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Channel indices best first: kept before masked, then by saliency, then by index.

    Masked channels come last so a group never re-grows; the index tie-break makes every
    rank of a distributed run order equal saliencies identically.
    """
    masked = np.ones(len(saliency), dtype=np.int8)
    masked[kept] = 0
    return np.lexsort((np.arange(len(saliency)), -saliency, masked))


class HalpPruner:
    """Hardware-aware latency pruning (HALP) driven by ``step()`` calls from a training loop.

    ``target`` is a fraction of the dense predicted latency (0 < target <= 1) and ``target_ms``
    an absolute budget; give exactly one. ``unit`` is channels per pruning unit (an int, or
    {group id: int} over the default of 8). The stem (first layer run on the input) and the
    classifier output are never pruned; ``ignore`` names more layers to leave alone.
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
        ignore: Iterable[str | nn.Module] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        log: Callable[[str], Any] = _log.info,
    ):
        if (target is None) == (target_ms is None):
            raise HalpError("give exactly one of target= (fraction of the dense latency) or "
                            "target_ms= (milliseconds)")
        if target is not None and not 0 < target <= 1:
            raise HalpError(f"target={target} must be a fraction in (0, 1]; use target_ms= for "
                            "milliseconds")
        if target_ms is not None and not target_ms > 0:
            raise HalpError(f"target_ms={target_ms} must be a positive number of milliseconds")
        for name, value in (("steps", steps), ("interval", interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HalpError(f"{name}={value!r} must be a positive int")
        self.model = _unwrap(model)
        self.example_input = example_input
        self.lut = lut
        self.steps, self.interval, self._log = steps, interval, log
        stem = first_layer(self.model, example_input)
        self.spec = analyze(self.model, example_input,
                            ignore=[*([stem] if stem else []), *(ignore or [])])
        lut.check_spec(self.spec)
        self._groups = self._sizable_groups()
        if not self._groups:
            raise HalpError("the model has no prunable channel groups (all reach the output, "
                            "are grouped convolutions or are ignored); see `halp analyze`")
        self._units = _units(unit, self.spec, self._groups,
                             default=int(lut.meta.get("step") or DEFAULT_UNIT))
        self._choices = {g: _choices(self.spec.group(g).channels, u)
                         for g, u in self._units.items()}
        self._charged = {g: [la for la in self.spec.layers if la.out_group == g]
                         for g in self._groups}
        self._touching = {g: [la for la in self.spec.layers if la.out_group == g
                              or any(s == g for s, _ in la.in_sources)] for g in self._groups}
        self._dense_ms = lut.predict(self.spec)
        self._target_ms = self._check_target(target, target_ms)
        self._budgets = [self._dense_ms * (self._target_ms / self._dense_ms) ** (s / steps)
                         for s in range(1, steps)] + [self._target_ms]
        self._saliency = TaylorSaliency(self.model, self.spec, self._groups)
        self._dg = dependency_graph(self.model, example_input)
        self._calls = 0
        self._step = 0
        self._predicted = self._dense_ms
        self._history: list[dict[str, float]] = []
        self._keep = {g: np.arange(self.spec.group(g).channels) for g in self._groups}
        self._entries: MaskEntries = []
        self._grad_masks: dict[nn.Parameter, list[tuple[int, torch.Tensor]]] = {}
        if optimizer is not None:
            optimizer.register_step_post_hook(lambda *_: self.apply_masks())

    def _sizable_groups(self) -> list[int]:
        """The groups the latency model can size (``NetworkSpec.partial_layers``); the others
        are left dense, and said so."""
        groups = []
        for group in self.spec.prunable_groups:
            partial = self.spec.partial_layers(group.id)
            if partial:
                self._log(f"HALP leaves group {group.id} dense: layers {partial} hold only part "
                          "of its channels (concatenation/split), which the latency model "
                          "cannot size")
            else:
                groups.append(group.id)
        return groups

    def _check_target(self, target: float | None, target_ms: float | None) -> float:
        """The target in ms, or InfeasibleBudget when even the smallest network exceeds it."""
        ms = self._dense_ms * target if target is not None else float(target_ms)
        smallest = self.lut.predict(self.spec, {g: int(c[1]) for g, c in self._choices.items()})
        minimum = self._minimum_ms = min(smallest, self._dense_ms)  # noisy LUTs may invert them
        if ms < minimum:
            raise InfeasibleBudget(
                f"target {ms:.4g} ms is below the fastest network this LUT predicts, "
                f"{minimum:.4g} ms ({minimum / self._dense_ms:.3f} of the dense "
                f"{self._dense_ms:.4g} ms, every prunable group at one unit): raise the target "
                "to at least that, or make more layers prunable",
                minimum,
            )
        return ms

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
        return self._dense_ms

    @property
    def target_ms(self) -> float:
        return self._target_ms

    @property
    def minimum_ms(self) -> float:
        """The smallest target this pruner accepts (every group at one unit)."""
        return self._minimum_ms

    @property
    def choices(self) -> dict[int, np.ndarray]:
        """Channel counts each group may keep; index k = units kept (index 0 is 0 channels)."""
        return {g: c.copy() for g, c in self._choices.items()}

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
        order, gains = self._ranked({g: mean[g].numpy() for g in self._groups})
        counts = self._solve(budget, gains, self.counts)
        keep = self._broadcast({g: np.sort(order[g][:counts[g]]) for g in self._groups})
        self._set_keep(keep)
        self._step += 1
        self._predicted = self.lut.predict(self.spec, self.counts)
        kept, total = sum(self.counts.values()), sum(len(o) for o in order.values())
        self._history.append({"step": self._step, "budget_ms": budget,
                              "predicted_ms": self._predicted, "kept": kept, "total": total})
        if not _distributed() or dist.get_rank() == 0:
            self._log(f"HALP step {self._step}/{self.steps}: budget {budget:.4g} ms, predicted "
                      f"{self._predicted:.4g} ms (dense {self._dense_ms:.4g}, target "
                      f"{self._target_ms:.4g}), channels kept {kept}/{total}")

    def plan(self, budget_ms: float, saliency: Mapping[int, np.ndarray], *,
             steps: int = 1) -> dict[int, int]:
        """Channels per group that ``steps`` knapsack steps on the exponential schedule would
        keep, from the current architecture down to ``budget_ms``, given per-channel
        saliencies; nothing is masked (for `verify`). One big step prices every layer at
        today's input counts and so over-prunes; several small steps track the real network.
        """
        gains = self._ranked(saliency)[1]
        counts = self.counts
        start = self.lut.predict(self.spec, counts)
        for s in range(1, steps + 1):
            counts = self._solve(start * (budget_ms / start) ** (s / steps), gains, counts)
        return counts

    def _ranked(self, saliency: Mapping[int, np.ndarray]
                ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Per group: channel order (best first) and gains[c] = saliency of the best c."""
        sal = {g: np.asarray(saliency[g], dtype=np.float64) for g in self._groups}
        order = {g: _rank(sal[g], self._keep[g]) for g in self._groups}
        gains = {g: np.concatenate(([0.0], np.cumsum(sal[g][order[g]]))) for g in self._groups}
        return order, gains

    def _layer_ms(self, layer: LayerSpec, counts: Mapping[int, int]) -> float:
        return self.lut.latency(layer, *layer.dims(counts))

    def _solve(self, budget: float, gains: Mapping[int, np.ndarray],
               current: Mapping[int, int]) -> dict[int, int]:
        """Counts per group within ``budget`` by true prediction, maximising kept saliency,
        never above ``current``."""
        allowed = {g: c[c <= current[g]] for g, c in self._choices.items()}
        values = [gains[g][allowed[g]] for g in self._groups]
        costs = [self._costs(g, allowed[g], current) for g in self._groups]
        # everything not charged to a group (its layers at today's counts, the constant)
        fixed = self.lut.predict(self.spec, current) - math.fsum(c[-1] for c in costs)
        room = budget - fixed
        best = current
        for _ in range(MAX_TIGHTEN):
            try:
                keep = solve(values, costs, room).keep
            except InfeasibleBudget:
                break
            counts = {g: int(allowed[g][k]) for g, k in zip(self._groups, keep, strict=True)}
            predicted = self.lut.predict(self.spec, counts)
            if predicted <= budget:
                return counts
            best = counts
            room -= predicted - budget
        counts = self._greedy(best, budget, gains)
        if self.lut.predict(self.spec, counts) <= budget:
            return counts
        # only a LUT where smaller layers measured slower gets here: prune no further
        self._log(f"HALP step {self._step + 1}/{self.steps}: no smaller network fits "
                  f"{budget:.4g} ms in this LUT; keeping the current channels")
        return current

    def _costs(self, g: int, allowed: np.ndarray, current: Mapping[int, int]) -> np.ndarray:
        """Latency of the layers producing group g's channels at each allowed count, with
        their inputs at today's counts (depthwise layers: input = output)."""
        costs = np.zeros(len(allowed))
        for i, cout in enumerate(allowed[1:].tolist(), start=1):
            costs[i] = math.fsum(self.lut.latency(la, cout if la.op == "dwconv"
                                                  else la.dims(current)[0], cout)
                                 for la in self._charged[g])
        return costs

    def _greedy(self, counts: dict[int, int], budget: float,
                gains: Mapping[int, np.ndarray]) -> dict[int, int]:
        """Drop the unit losing the least saliency per ms saved until the prediction fits.

        The fallback when re-solving does not converge; every group at one unit was checked
        against the target at construction, so it ends within budget unless the LUT prices
        smaller layers higher.
        """
        counts = dict(counts)
        predicted = self.lut.predict(self.spec, counts)
        while predicted > budget:
            best: tuple[float, float, int, int] | None = None
            for g in self._groups:
                smaller = self._choices[g][self._choices[g] < counts[g]]
                if len(smaller) <= 1:  # only 0 is below: the group is at one unit
                    continue
                trial = {**counts, g: int(smaller[-1])}
                saved = math.fsum(self._layer_ms(la, counts) - self._layer_ms(la, trial)
                                  for la in self._touching[g])
                lost = float(gains[g][counts[g]] - gains[g][trial[g]])
                ratio = lost / saved if saved > 0 else math.inf
                if best is None or (ratio, lost, g) < best[:3]:
                    best = (ratio, lost, g, trial[g])
            if best is None:
                break
            counts[best[2]] = best[3]
            predicted = self.lut.predict(self.spec, counts)
        return counts

    # -- masks -------------------------------------------------------------------------------

    def _broadcast(self, keep: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Rank 0's kept channels on every rank (they already agree; this makes it certain)."""
        if not _distributed():
            return keep
        sizes = [self.spec.group(g).channels for g in self._groups]
        flat = torch.zeros(sum(sizes), dtype=torch.int32)
        for offset, g in zip(np.cumsum([0, *sizes[:-1]]), self._groups, strict=True):
            flat[torch.as_tensor(offset + keep[g])] = 1
        flat = flat.to(comm_device())
        dist.broadcast(flat, src=0)
        parts = torch.split(flat.cpu(), sizes)
        return {g: torch.nonzero(p).flatten().numpy() for g, p in zip(self._groups, parts,
                                                                        strict=True)}

    def _set_keep(self, keep: Mapping[int, np.ndarray]) -> None:
        """Adopt new kept channels: rebuild the masks, gradient hooks, and apply them."""
        self._keep = {g: np.asarray(keep[g], dtype=np.int64) for g in self._groups}
        drop = {g: np.setdiff1d(np.arange(self.spec.group(g).channels), k).tolist()
                for g, k in self._keep.items()}
        self._entries = mask_entries(self.model, mask_plan(self._dg, self.spec, drop))
        for ops in self._grad_masks.values():
            ops.clear()
        for param, dim, idx in self._entries:
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
            "dense_ms": self._dense_ms, "target_ms": self._target_ms,
            "predicted_ms": self._predicted, "units": dict(self._units),
            "keep": self.keep, "history": self.history,
            "saliency": self._saliency.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved schedule position, saliency and masks (masks applied at once)."""
        if state.get("format") != STATE_FORMAT:
            raise HalpError(f"pruner state format {state.get('format')!r} is not "
                            f"{STATE_FORMAT}; it was saved by another version")
        if {int(g): u for g, u in state["units"].items()} != self._units:
            raise HalpError("the saved pruner state is for other channel groups or units; "
                            "resume with the same model, input shape, ignore= and unit=")
        saved = {"target": float(state["target_ms"]), "dense": float(state["dense_ms"])}
        for what, mine, theirs in (("target", self._target_ms, saved["target"]),
                                   ("dense prediction", self._dense_ms, saved["dense"])):
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
        self._dense_ms, self._target_ms = float(state["dense_ms"]), float(state["target_ms"])
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
