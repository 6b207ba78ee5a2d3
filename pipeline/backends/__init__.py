"""Runtime backends behind one protocol: what a LUT entry and a verified engine are timed with.

Backend modules are imported only when asked for, so the package imports on a machine without
TensorRT or pycuda; only :mod:`pipeline.backends.tensorrt` touches them.
"""

from __future__ import annotations

import importlib
import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import HalpError
from ..onnx_layers import layer_inputs, packed_model
from ..spec import LayerSpec
from .timing import Measurement, TimingSettings

__all__ = ["BACKENDS", "PRECISIONS", "Backend", "Measurement", "OnnxBackend", "TimingSettings",
           "get_backend", "onnx_bytes"]

PRECISIONS = ("fp32", "fp16")

#: backend name -> (module, class); modules are imported lazily
BACKENDS = {
    "onnxruntime": ("pipeline.backends.onnxruntime", "OnnxRuntimeBackend"),
    "torch": ("pipeline.backends.torch", "TorchBackend"),
    "tensorrt": ("pipeline.backends.tensorrt", "TensorRTBackend"),
}


@runtime_checkable
class Backend(Protocol):
    name: str  # "onnxruntime" | "torch" | "tensorrt"
    precision: str  # "fp32" | "fp16"
    default_step: int  # channel granularity of the device's kernels: LUT step, pruning unit

    def describe(self) -> dict:
        """backend, precision, device, device_key, versions, threads, settings: LUT metadata."""
        ...

    def time_onnx(self, model: onnx.ModelProto | bytes | str | Path,
                  inputs: dict[str, np.ndarray]) -> Measurement: ...

    def time_layer(self, layer: LayerSpec, cin: int, cout: int,
                   copies: int = 1) -> Measurement:
        """The layer at (cin, cout) as it costs inside a network: ``copies`` instances with
        their own weights run back to back (:func:`~pipeline.onnx_layers.copies_for`), and
        the measurement is one instance's share."""
        ...

    def time_module(self, model: nn.Module, example_input: torch.Tensor) -> Measurement: ...

    def module_timer(self, model: nn.Module,
                     example_input: torch.Tensor) -> Callable[[], Measurement]:
        """Prepare ``model`` once (export, fold, ...); each call of the result is one more
        measurement, for interleaved rounds."""
        ...


def onnx_bytes(model: onnx.ModelProto | bytes | str | os.PathLike) -> bytes:
    """Serialized ONNX from a proto, bytes or a file path (a missing file is a clear error)."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    path = Path(model)
    if not path.is_file():
        raise HalpError(f"ONNX model {str(path)!r} does not exist; export one with "
                        "pipeline.export.to_onnx or check the path")
    return path.read_bytes()


class OnnxBackend(ABC):
    """Shared by backends that deploy ONNX: a layer is its single-layer graph, a network its
    export; both are then timed by the subclass's ``time_onnx``."""

    name: str
    precision: str
    settings: TimingSettings
    #: which outputs a packed layer graph keeps (:func:`~pipeline.onnx_layers.packed_model`)
    packed_outputs = "one"

    @abstractmethod
    def time_onnx(self, model: onnx.ModelProto | bytes | str | Path,
                  inputs: dict[str, np.ndarray]) -> Measurement:
        """Time one inference of ``model`` on ``inputs`` (name -> array)."""

    def time_layer(self, layer: LayerSpec, cin: int, cout: int,
                   copies: int = 1) -> Measurement:
        graph = packed_model(layer, cin, cout, copies, outputs=self.packed_outputs)
        return self.time_onnx(graph, layer_inputs(layer, cin, cout)).per_copy(copies)

    def time_module(self, model: nn.Module, example_input: torch.Tensor) -> Measurement:
        return self.module_timer(model, example_input)()

    def module_timer(self, model: nn.Module,
                     example_input: torch.Tensor) -> Callable[[], Measurement]:
        """Export once; each call times the exported network again."""
        from ..export import to_onnx  # export pulls in torch.onnx: only when a network is timed

        proto = to_onnx(model, example_input, check=False)
        inputs = {proto.graph.input[0].name: example_input.cpu().numpy()}
        return lambda: self.time_onnx(proto, inputs)


def get_backend(name: str, precision: str = "fp32", **options: object) -> Backend:
    """The backend ``name`` at ``precision``.

    ``options``: the timing settings (``warmup``, ``repeats``, ``min_sample_ms``, ``warmup_ms``)
    and the backend's own keywords (e.g. ``threads``, ``device``).
    """
    if name not in BACKENDS:
        raise HalpError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise HalpError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    timing = {k: options.pop(k) for k in TimingSettings.names() if k in options}
    module_name, class_name = BACKENDS[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    own = [p for p in inspect.signature(cls).parameters if p not in ("precision", "settings")]
    unknown = sorted(set(options) - set(own))
    if unknown:
        raise HalpError(
            f"backend {name!r} has no option {', '.join(unknown)}; valid options: "
            f"{', '.join(own + list(TimingSettings.names()))}"
        )
    return cls(precision, settings=TimingSettings(**timing), **options)
