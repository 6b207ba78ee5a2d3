"""What a backend can do, declared as small runtime-checkable protocols, and what it is.

Callers ask for a capability (``isinstance(backend, EngineBuilder)``) rather than a backend's
name, so adding a backend means implementing protocols, not editing every branch; and no
backend carries a method that exists only to refuse. Torch and ONNX are named for type checkers
only: reading a table imports this module and must not load them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..kinds import DeviceKind, Precision
from .device import kind_of
from .timing import Measurement, TimingSettings

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch
    from torch import nn

    from ..spec import LayerSpec


@dataclass(frozen=True)
class BackendInfo:
    """Which backend, precision and device a measurement was taken with: a table's identity.

    :meth:`to_dict` is the form tables and journal headers record (a table is refused where
    ``backend``, ``precision`` or ``device_key`` differ); ``device`` is the model name for
    people, ``device_key`` (:mod:`~pipeline.backends.device`) the one compared.
    """

    backend: str
    precision: Precision
    device: str
    device_key: str
    versions: Mapping[str, str]
    threads: int | None
    settings: TimingSettings
    #: how the runtime executes: ONNX Runtime's execution provider, TensorRT's builder flags
    provider: str | None = None

    @property
    def kind(self) -> DeviceKind:
        """CPU or GPU: decides the clock, the statistic and how a verify run is set up."""
        return kind_of(self.device_key)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, key for key as tables and journals have always recorded it, so they
        still load and resume."""
        provider = {} if self.provider is None else {"provider": self.provider}
        return {"backend": self.backend, "precision": str(self.precision),
                "device": self.device, "device_key": self.device_key, **provider,
                "versions": dict(self.versions), "threads": self.threads,
                "settings": self.settings.to_dict()}


@runtime_checkable
class LayerTimer(Protocol):
    """Times one layer as it costs inside a network: what a LUT entry is."""

    def time_layer(self, layer: LayerSpec, cin: int, cout: int,
                   copies: int = 1) -> Measurement:
        """The layer at (cin, cout) as it costs inside a network: ``copies`` instances with
        their own weights run back to back (:func:`~pipeline.onnx_layers.copies_for`), and
        the measurement is one instance's share."""
        ...


@runtime_checkable
class NetworkTimer(Protocol):
    """Times a whole nn.Module: the calibration references and verify's pruned variants."""

    def time_module(self, model: nn.Module, example_input: torch.Tensor) -> Measurement: ...

    def module_timer(self, model: nn.Module,
                     example_input: torch.Tensor) -> Callable[[], Measurement]:
        """Prepare ``model`` once (export, fold, ...); each call of the result is one more
        measurement, for interleaved rounds."""
        ...


@runtime_checkable
class Backend(LayerTimer, NetworkTimer, Protocol):
    """What every backend does: time layers and networks, and say what it is."""

    name: str  # a key of pipeline.backends.BACKENDS
    precision: Precision
    settings: TimingSettings
    default_step: int  # channel granularity of the device's kernels: LUT step, pruning unit

    def describe(self) -> BackendInfo:
        """This backend's identity, as a table built with it records it."""
        ...


@runtime_checkable
class OnnxTimer(Protocol):
    """Times an ONNX model: backends that deploy ONNX."""

    def time_onnx(self, model: onnx.ModelProto | bytes | str | PathLike[str],
                  inputs: dict[str, np.ndarray]) -> Measurement:
        """Time one inference of ``model`` on ``inputs`` (name -> array)."""
        ...

    def onnx_timer(self, model: onnx.ModelProto | bytes | str | PathLike[str],
                   inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        """Prepare ``model`` once (a session, an engine build: seconds on a Jetson); each call
        of the result is one more measurement, for interleaved rounds."""
        ...


@runtime_checkable
class EngineBuilder(Protocol):
    """Builds a deployable engine file from ONNX and times it: what ``halp engine`` and
    ``halp prune`` deploy through. Methods only, so a backend class can be checked with
    ``issubclass`` before it is made (:func:`~pipeline.backends.engine_builders`)."""

    def build_engine(self, model: onnx.ModelProto, out_dir: Path, name: str) -> Path:
        """Write the engine of ``model`` to ``out_dir/<name><suffix>`` atomically (the suffix
        says which runtime loads it) and return that path."""
        ...

    def engine_timer(self, path: Path,
                     inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        """Load the engine file at ``path`` (one :meth:`build_engine` wrote) once; each call of
        the result times it on ``inputs`` again."""
        ...
