"""Eager PyTorch backend: CPU, or CUDA with cuDNN autotuning as in the HALP paper's own LUTs."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from ..errors import BackendUnavailable, HalpError
from ..kinds import DeviceKind, Precision
from ..onnx_layers import layer_input
from ..spec import LayerSpec
from ..torch_layers import torch_layer
from .capabilities import BackendInfo
from .device import channel_step, cpu_key, cpu_name, cuda_key, thread_count
from .timing import BatchTimer, Measurement, TimingSettings, host_timer, measure


def cuda_timer(run: Callable[[], object]) -> BatchTimer:
    """A :data:`BatchTimer` on CUDA events around back-to-back launches (not the host clock)."""

    def time_batch(k: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(k):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return time_batch


log = logging.getLogger(__name__)


def deployable(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each BatchNorm folded into its convolution.

    ONNX Runtime and TensorRT fold BatchNorm when they build an engine, and the LUT's single
    layers are convolutions with a bias, so a network is timed the same way. A model that
    torch.fx cannot trace (data-dependent control flow) is timed unfused, and the log says so.
    """
    model = copy.deepcopy(model).eval()
    try:
        return fuse(model)
    except Exception as exc:  # tracing fails in many ways (TraceError, TypeError, ...)
        log.warning("timing %s without folding BatchNorm: torch.fx cannot trace it (%s)",
                    type(model).__name__, exc)
        return model


def cuda_graph(module: nn.Module, x: torch.Tensor) -> tuple[Callable[[], None], object]:
    """``module(x)`` captured as a CUDA graph: (replay, the output it overwrites).

    Eager mode launches every op from Python, and on a big GPU that host overhead, not the
    kernels, sets the time of a whole network: a batch-32 resnet50 on an H200 measured about
    the same at full, half and quarter width. A replayed graph launches everything at once, as a
    TensorRT engine does. Warm-up runs on a side stream first, so cuDNN's benchmark mode has
    chosen its kernels before they are captured.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            module(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = module(x)
    return graph.replay, out


class _Copies(nn.Module):
    """Instances of one layer, each with its own weights, run one after the other on the same
    input: a packed layer (:func:`~pipeline.onnx_layers.packed_model`) for eager torch.

    Copies are scaled clones of ``layer`` (as the ONNX packing does: no weights drawn again)
    and share its buffers: the feature map an epilogue scales is one warm tensor for all.
    """

    def __init__(self, layer: nn.Module, copies: int):
        super().__init__()
        shared = {id(b): b for b in layer.buffers()}
        clones = [copy.deepcopy(layer, dict(shared)) for _ in range(1, copies)]
        with torch.no_grad():
            for i, clone in enumerate(clones, start=1):
                for p in clone.parameters():
                    p.mul_(1.0 + 1e-3 * i)
        self.copies = nn.ModuleList([layer, *clones])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.copies:
            out = layer(x)
        return out


class TorchBackend:
    """Times nn.Modules eagerly under ``torch.inference_mode``.

    On CPU ``threads`` pins ``torch.set_num_threads`` while timing (restored afterwards); on
    CUDA (``device="cuda"`` or ``"cuda:N"``) cuDNN benchmark mode is on while timing, so the
    warm-up picks each shape's fastest kernel, the module is replayed as a CUDA graph
    (:func:`cuda_graph`), and fp16 runs the module in ``.half()``.
    """

    name = "torch"

    def __init__(self, precision: Precision = Precision.FP32, *,
                 settings: TimingSettings | None = None, threads: int | None = None,
                 device: str = "cpu"):
        self.device = torch.device(device)
        if self.device.type not in tuple(DeviceKind):
            raise HalpError(f"torch device {device!r} is not supported; use 'cpu' or 'cuda[:N]'")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"torch device {device!r} needs a CUDA GPU and a CUDA build of torch "
                f"(this torch {torch.__version__} sees none); use device='cpu'"
            )
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.kind = DeviceKind(self.device.type)
        if precision == Precision.FP16 and self.kind == DeviceKind.CPU:
            raise HalpError("the torch backend runs fp16 on CUDA only; use device='cuda' or fp32")
        self.precision = precision
        self.dtype = torch.float16 if precision == Precision.FP16 else torch.float32
        self.settings = (settings or TimingSettings()).resolved(self.kind)
        self.threads = thread_count(threads)
        self.default_step = channel_step(self.kind)

    @contextmanager
    def _pinned(self) -> Iterator[None]:
        """Process-wide torch settings for the duration of one measurement."""
        if self.kind == DeviceKind.CUDA:
            previous = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
            try:
                with torch.cuda.device(self.device):
                    yield
            finally:
                torch.backends.cudnn.benchmark = previous
        else:
            previous = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                yield
            finally:
                torch.set_num_threads(previous)

    def _time(self, module: nn.Module, x: torch.Tensor) -> Measurement:
        module = module.eval().to(self.device, self.dtype)
        x = x.to(self.device, self.dtype)
        with self._pinned(), torch.inference_mode():
            if self.kind == DeviceKind.CPU:
                return measure(host_timer(lambda: module(x)), self.settings)
            replay, _ = cuda_graph(module, x)
            return measure(cuda_timer(replay), self.settings)

    def time_layer(self, layer: LayerSpec, cin: int, cout: int,
                   copies: int = 1) -> Measurement:
        packed = _Copies(torch_layer(layer, cin, cout), copies)
        x = torch.from_numpy(layer_input(layer, cin))
        return self._time(packed, x).per_copy(copies)

    def time_module(self, model: nn.Module, example_input: torch.Tensor) -> Measurement:
        return self.module_timer(model, example_input)()

    def module_timer(self, model: nn.Module,
                     example_input: torch.Tensor) -> Callable[[], Measurement]:
        """Fold once (a copy: moving/casting must not change the caller's model); each call
        times the folded network again."""
        folded = deployable(model)
        return lambda: self._time(folded, example_input)

    def describe(self) -> BackendInfo:
        versions = {"torch": torch.__version__, "numpy": np.__version__}
        if self.kind == DeviceKind.CUDA:
            device = torch.cuda.get_device_name(self.device)
            key = cuda_key(device, torch.cuda.get_device_capability(self.device))
            versions |= {"cuda": torch.version.cuda,
                         "cudnn": str(torch.backends.cudnn.version())}
        else:
            device, key = cpu_name(), cpu_key(self.threads)
        return BackendInfo(
            backend=self.name, precision=self.precision, device=device, device_key=key,
            versions=versions, threads=self.threads if self.kind == DeviceKind.CPU else None,
            settings=self.settings)
