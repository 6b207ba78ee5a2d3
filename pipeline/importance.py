"""Taylor saliency per channel group, accumulated over training iterations.

HALP ranks channels by the first-order Taylor estimate of the loss change when a channel is
removed. On batch-norm parameters this is ``γ·∂L/∂γ + β·∂L/∂β`` per channel: zeroing γ and β
silences the channel, so the product with the gradient is the linearised effect of doing so.
Channels of one coupled group are removed together, so the contributions of all the group's
BN layers are summed *before* taking the absolute value. Groups without batch norm fall back
to ``w·∂L/∂w`` summed over the filters (and biases) that produce each channel.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .errors import HalpError
from .spec import NetworkSpec


def _per_out_channel(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Sum a weight-shaped tensor of ``module`` per output channel (bias: unchanged)."""
    if t.dim() == 1:
        return t
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # weight is (in, out / groups, *k): output channel o lives in block o // (out / groups)
        g = module.groups
        t = t.reshape(g, t.shape[0] // g, t.shape[1], -1).sum((1, 3))
        return t.reshape(-1)
    return t.reshape(t.shape[0], -1).sum(1)


def _taylor(param: torch.Tensor | None) -> torch.Tensor | None:
    """``param · ∂L/∂param`` elementwise, or None without a gradient."""
    if param is None or param.grad is None:
        return None
    return (param.detach() * param.grad).float()


class TaylorSaliency:
    """Per-channel saliency of the pruner's channel groups, summed over iterations.

    ``accumulate()`` is called once per iteration after ``loss.backward()``; ``average()``
    returns the mean since the last ``reset()``. An iteration whose saliency is not finite
    (NaN/inf gradients, e.g. an AMP overflow) is skipped and counted in ``skipped``.
    """

    def __init__(self, model: nn.Module, spec: NetworkSpec, groups: Iterable[int]):
        modules = dict(model.named_modules())
        self.groups = list(groups)
        self._norms: dict[int, list[nn.Module]] = {}
        self._producers: dict[int, list[nn.Module]] = {}
        for gid in self.groups:
            group = spec.group(gid)
            norms = [modules[n] for n in group.norms
                     if getattr(modules[n], "weight", None) is not None
                     and modules[n].weight.requires_grad]
            if norms:
                self._norms[gid] = norms
            else:
                self._producers[gid] = [modules[n] for n in group.producers]
        device = next(model.parameters()).device
        self.sums = {g: torch.zeros(spec.group(g).channels, dtype=torch.float64, device=device)
                     for g in self.groups}
        self.iterations = 0  # accumulated since the last reset
        self.skipped = 0  # non-finite iterations, over the whole run

    def scores(self) -> dict[int, torch.Tensor]:
        """This iteration's saliency per group (float32, one value per channel)."""
        out, seen = {}, False
        for gid in self.groups:
            terms = [t for t in self._terms(gid) if t is not None]
            seen = seen or bool(terms)
            out[gid] = torch.stack(terms).sum(0).abs() if terms else \
                torch.zeros(self.sums[gid].numel(), device=self.sums[gid].device)
        if not seen:
            raise HalpError(
                "no gradients on the pruned layers: call pruner.step() after loss.backward() "
                "and before optimizer.zero_grad()"
            )
        return out

    def _terms(self, gid: int) -> list[torch.Tensor | None]:
        """Per-channel Taylor terms of the group's BN layers, or else of its producers."""
        if gid in self._norms:
            return [_taylor(p) for m in self._norms[gid] for p in (m.weight, m.bias)]
        return [None if (t := _taylor(p)) is None else _per_out_channel(m, t)
                for m in self._producers[gid]
                for p in (m.weight, getattr(m, "bias", None))]

    def accumulate(self) -> bool:
        """Add this iteration's saliency; returns False (and counts it) if it was not finite."""
        scores = self.scores()
        finite = torch.stack([torch.isfinite(s).all() for s in scores.values()]).all()
        if not bool(finite):
            self.skipped += 1
            return False
        for gid, s in scores.items():
            if self.sums[gid].device != s.device:  # the model moved after construction
                self.sums[gid] = self.sums[gid].to(s.device)
            self.sums[gid] += s.double()
        self.iterations += 1
        return True

    def average(self, distributed: bool = True) -> tuple[dict[int, torch.Tensor], int]:
        """Mean saliency since the last reset and the number of iterations behind it.

        Under an initialised ``torch.distributed`` the sums and counts of all ranks are added
        first, so every rank gets the same average over all ranks' finite iterations.
        """
        flat = torch.cat([self.sums[g] for g in self.groups]
                         + [torch.tensor([float(self.iterations)], dtype=torch.float64,
                                         device=self.sums[self.groups[0]].device)])
        if distributed and dist.is_available() and dist.is_initialized():
            flat = flat.to(comm_device())
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        n = round(flat[-1].item())
        parts = torch.split(flat[:-1].cpu(), [self.sums[g].numel() for g in self.groups])
        mean = {g: p / max(n, 1) for g, p in zip(self.groups, parts, strict=True)}
        return mean, n

    def reset(self) -> None:
        for s in self.sums.values():
            s.zero_()
        self.iterations = 0

    def state_dict(self) -> dict:
        return {"sums": {g: s.cpu().clone() for g, s in self.sums.items()},
                "iterations": self.iterations, "skipped": self.skipped}

    def load_state_dict(self, state: Mapping) -> None:
        sums = {int(g): s for g, s in state["sums"].items()}
        if sorted(sums) != sorted(self.sums):
            raise HalpError("saliency state is for other channel groups; resume with the same "
                            "model, ignore= and LUT as the saved run")
        for g, s in sums.items():
            self.sums[g].copy_(torch.as_tensor(s))
        self.iterations = int(state["iterations"])
        self.skipped = int(state["skipped"])


def comm_device() -> torch.device:
    """Device for collective tensors: NCCL needs the current GPU, everything else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
