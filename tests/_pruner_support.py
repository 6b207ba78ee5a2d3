"""Shared by the pruner tests: small real models, real ORT LUTs, and the DDP worker.

Lives outside the test modules so ``torch.multiprocessing.spawn`` can import the worker.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.backends import get_backend
from pipeline.lut import LatencyTable, build_lut
from pipeline.pruner import HalpPruner
from pipeline.structure import analyze

INPUT = (1, 3, 32, 32)
BATCH = 4


class SmallNet(nn.Module):
    """A residual CNN small enough that spawned ranks stay quick (no torchvision import)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16, stride=2)
        self.expand = _cbr(16, 64, stride=2)
        self.block = nn.Sequential(_cbr(64, 64), nn.Conv2d(64, 64, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(64))
        self.head = _cbr(64, 128, stride=2)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand(self.stem(x))
        x = torch.relu(x + self.block(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.head(x), 1), 1))


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


def make_model(name: str, seed: int = 0) -> nn.Module:
    """``"small"`` (SmallNet) or a torchvision model name, seeded, 10 classes."""
    torch.manual_seed(seed)
    if name == "small":
        return SmallNet()
    import torchvision  # only here: spawned ranks use SmallNet and skip this 4 s import

    return torchvision.models.get_model(name, num_classes=10)


@functools.cache
def lut_path(name: str) -> Path:
    """A coarse LUT for ``name`` at INPUT, measured once per test process with real ORT."""
    model = make_model(name)
    x = torch.randn(*INPUT)
    backend = get_backend("onnxruntime", threads=1, warmup=1, repeats=3, warmup_ms=0,
                          min_sample_ms=0)
    folder = tempfile.mkdtemp(prefix="halp-pruner-test-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    out = Path(folder) / f"{name}.json"
    build_lut(analyze(model, x, name=name), backend, step=8, max_points=4, out=out,
              model=model, example_input=x, progress=False)
    return out


def batch(i: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic random training batch number ``i``."""
    gen = torch.Generator().manual_seed(seed * 10_000 + i)
    return torch.randn(BATCH, *INPUT[1:], generator=gen), torch.randint(0, 10, (BATCH,),
                                                                        generator=gen)


def train(model: nn.Module, pruner: HalpPruner, optimizer: torch.optim.Optimizer | None,
          iterations: range, seed: int = 0) -> None:
    """SGD iterations with the pruner in the loop (masks via the optimizer hook).

    Without an optimizer, a plain gradient step and ``apply_masks()``: spawned ranks skip the
    first ``torch.optim`` use, which imports torch._dynamo (seconds on a loaded machine).
    """
    model.train()
    for i in iterations:
        x, y = batch(i, seed)
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.step()
        if optimizer is None:
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
            pruner.apply_masks()
            model.zero_grad()
        else:
            optimizer.step()
            optimizer.zero_grad()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def ddp_worker(rank: int, world: int, init: str, lut: str, target_ms: float, out: str) -> None:
    """One rank: same initial weights, different data per rank, no DDP gradient averaging."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = make_model("small")
        pruner = HalpPruner(model, torch.randn(*INPUT), LatencyTable.load(lut),
                            target_ms=target_ms, steps=2, interval=2, log=lambda _m: None)
        train(model, pruner, None, range(4), seed=rank + 1)
        torch.save({"keep": pruner.keep, "history": pruner.history,
                    "state": {k: v.clone() for k, v in model.state_dict().items()}},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
