"""Runtime backends: what a LUT entry and a verified engine are timed with.

Each backend declares what it can do as small protocols (:mod:`.capabilities`): every one times
layers and networks (:class:`Backend`); those deploying ONNX time it (:class:`OnnxTimer`); those
with an engine format build and time engine files (:class:`EngineBuilder`). Backend modules are
imported only when asked for, so the package imports on a machine without TensorRT or pycuda,
and this package root loads neither torch nor onnx: reading a latency table goes through it.
"""

from __future__ import annotations

import importlib
import inspect

from ..errors import BackendUnavailable, HalpError
from ..kinds import Precision
from .capabilities import Backend, BackendInfo, EngineBuilder, LayerTimer, NetworkTimer, OnnxTimer
from .timing import Measurement, TimingSettings

__all__ = ["BACKENDS", "PRECISIONS", "Backend", "BackendInfo", "EngineBuilder", "LayerTimer",
           "Measurement", "NetworkTimer", "OnnxTimer", "TimingSettings", "available",
           "backend_class", "backend_options", "engine_builders", "get_backend",
           "get_backend_taking"]

PRECISIONS = tuple(Precision)

#: backend name -> (module, class); modules are imported lazily
BACKENDS = {
    "onnxruntime": ("pipeline.backends.onnxruntime", "OnnxRuntimeBackend"),
    "torch": ("pipeline.backends.torch", "TorchBackend"),
    "tensorrt": ("pipeline.backends.tensorrt", "TensorRTBackend"),
}


def _known(name: str) -> None:
    if name not in BACKENDS:
        raise HalpError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def backend_class(name: str) -> type:
    """The class of backend ``name``. Its module is imported, not its runtime: TensorRT and
    pycuda load only when a TensorRT backend is made."""
    _known(name)
    module_name, class_name = BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)


def backend_options(name: str) -> tuple[str, ...]:
    """The backend's own keywords (e.g. ``threads``, ``device``), so a caller holding settings
    for any backend passes only those this one takes."""
    params = inspect.signature(backend_class(name)).parameters
    return tuple(p for p in params if p not in ("precision", "settings"))


def engine_builders() -> tuple[str, ...]:
    """The backends with an engine format (:class:`EngineBuilder`), for choices and messages."""
    return tuple(name for name in BACKENDS if issubclass(backend_class(name), EngineBuilder))


def get_backend(name: str, precision: str = "fp32", **options: object) -> Backend:
    """The backend ``name`` at ``precision``; BackendUnavailable when its runtime or device is
    missing here, before any work starts.

    ``options``: the timing settings (``warmup``, ``repeats``, ``min_sample_ms``, ``warmup_ms``,
    ``statistic``) and the backend's own keywords (:func:`backend_options`).
    """
    _known(name)
    if precision not in PRECISIONS:
        raise HalpError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    timing = {k: options.pop(k) for k in TimingSettings.names() if k in options}
    own = list(backend_options(name))
    unknown = sorted(set(options) - set(own))
    if unknown:
        raise HalpError(
            f"backend {name!r} has no option {', '.join(unknown)}; valid options: "
            f"{', '.join(own + list(TimingSettings.names()))}"
        )
    return backend_class(name)(Precision(precision), settings=TimingSettings(**timing),
                               **options)


def get_backend_taking(name: str, precision: str, **wanted: object) -> Backend:
    """:func:`get_backend` with those of ``wanted`` that the backend takes and that are set:
    for callers holding settings meant for any backend (TensorRT takes no CPU threads)."""
    own = backend_options(name)
    return get_backend(name, precision,
                       **{k: v for k, v in wanted.items() if v is not None and k in own})


def available(name: str, precision: str = "fp32", **options: object) -> str | None:
    """None when backend ``name`` can run here with ``options``, else why not (the
    BackendUnavailable message: missing package or device). Making the backend is the check;
    it loads the runtime and finds the device, and measures nothing. Other errors (unknown
    name, bad option) are raised as by :func:`get_backend`."""
    try:
        get_backend(name, precision, **options)
    except BackendUnavailable as exc:
        return str(exc)
    return None
