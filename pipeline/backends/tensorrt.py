"""TensorRT backend: engines built from ONNX with polygraphy, timed with CUDA events (pycuda).

Written against the TensorRT 10 Python API (name-based I/O: ``num_io_tensors``,
``get_tensor_name/shape/dtype/mode``, ``IExecutionContext.set_tensor_address``,
``execute_async_v3``), polygraphy 0.49+ loaders (``NetworkFromOnnxBytes``, ``CreateConfig``,
``EngineBytesFromNetwork``, ``engine_from_bytes``, ``PolygraphyException``,
``G_LOGGER.verbosity``) and pycuda 2022.2+ (``autoprimaryctx``, ``Context.get_device``,
``Event.record(stream)``, ``Event.time_till``). ``tensorrt`` and
``pycuda`` are imported inside functions only: nothing else in the package imports them, and
the package works without them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx

from ..errors import BackendUnavailable, HalpError
from ..fsio import atomic_write_bytes
from ..kinds import DeviceKind, Precision
from .capabilities import BackendInfo
from .device import channel_step, cuda_key
from .onnx_base import OnnxBackend, onnx_bytes
from .timing import BatchTimer, Measurement, TimingSettings, measure

INSTALL_HINT = (
    "the tensorrt backend needs TensorRT 10 and pycuda on a machine with an NVIDIA GPU: "
    "pip install '.[tensorrt]' (the `tensorrt` extra; on Jetson use JetPack's TensorRT and "
    "pip install pycuda)"
)


def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or pycuda's driver error when there is no GPU
        raise BackendUnavailable(f"{INSTALL_HINT}; importing {name} failed: {exc}") from exc


def _cuda() -> ModuleType:
    """pycuda's driver module with the device's primary context current (shared with TensorRT,
    which uses the CUDA runtime and so the primary context)."""
    _require("pycuda.autoprimaryctx")
    return _require("pycuda.driver")


class _Bindings:
    """Device buffers for every I/O tensor of an engine, bound to one execution context."""

    def __init__(self, engine: object, inputs: dict[str, np.ndarray]):
        trt, cuda = _require("tensorrt"), _cuda()
        self.engine = engine  # the context must not outlive its engine
        self.context = engine.create_execution_context()
        self.buffers = []  # keep the allocations alive as long as the context uses them
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        wanted = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if sorted(wanted) != sorted(inputs):
            raise HalpError(f"the engine takes inputs {wanted}, got {sorted(inputs)}")
        for name in names:
            shape = tuple(engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise HalpError(f"tensor {name!r} has dynamic shape {shape}; export with static "
                                "shapes (pipeline.export.to_onnx does)")
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            buffer = cuda.mem_alloc(max(1, int(np.prod(shape)) * dtype.itemsize))
            if name in inputs:
                cuda.memcpy_htod(buffer, np.ascontiguousarray(inputs[name], dtype=dtype))
            self.context.set_tensor_address(name, int(buffer))
            self.buffers.append(buffer)
        self.stream = cuda.Stream()

    def timer(self) -> BatchTimer:
        cuda = _cuda()

        def time_batch(k: int) -> float:
            start, end = cuda.Event(), cuda.Event()
            start.record(self.stream)
            for _ in range(k):
                if not self.context.execute_async_v3(self.stream.handle):
                    raise HalpError("TensorRT execute_async_v3 failed; see the TensorRT log")
            end.record(self.stream)
            end.synchronize()
            return start.time_till(end)

        return time_batch


class TensorRTBackend(OnnxBackend):
    """Builds an engine per ONNX model at the backend's precision and times it on the device of
    pycuda's primary context; its engine files are the serialized plans (``.plan``)."""

    name = "tensorrt"
    #: TensorRT removes layers whose outputs nobody reads: every copy's output is kept
    packed_outputs = "all"

    def __init__(self, precision: Precision = Precision.FP32, *,
                 settings: TimingSettings | None = None):
        self.trt = _require("tensorrt")
        self.loaders = _require("polygraphy.backend.trt")
        self.cuda = _cuda()
        self.precision = precision
        self.settings = (settings or TimingSettings()).resolved(DeviceKind.CUDA)
        self.default_step = channel_step(DeviceKind.CUDA)

    def _plan(self, model: onnx.ModelProto | bytes | str | Path) -> bytes:
        """A serialized TensorRT plan for the ONNX model (fp16 lets TensorRT pick half kernels).

        TF32 is on, as in TensorRT's own builder config and trtexec: polygraphy's
        ``CreateConfig`` defaults to ``tf32=False`` and clears the flag, which would time strict
        FP32 kernels on Ampere and Orin that no deployed "fp32" engine runs.
        """
        # lazy loaders: the builder and network live only inside the build call
        build = self.loaders.EngineBytesFromNetwork(
            self.loaders.NetworkFromOnnxBytes(onnx_bytes(model)),
            config=self.loaders.CreateConfig(tf32=True, fp16=self.precision == Precision.FP16),
        )
        with self._quiet("could not build an engine"):
            return bytes(build())

    def _plan_timer(self, plan: bytes,
                    inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        """Deserialize once and bind once; each call measures the same context again."""
        with self._quiet("could not load the plan (a plan only loads in the TensorRT version "
                         "and on the GPU model that built it: rebuild it with `halp engine` "
                         "here)"):
            engine = self.loaders.engine_from_bytes(plan)
        time_batch = _Bindings(engine, inputs).timer()
        return lambda: measure(time_batch, self.settings)

    @contextlib.contextmanager
    def _quiet(self, failed: str) -> Iterator[None]:
        """polygraphy's logging at warnings only (it prints a configuration block per engine,
        through the progress bar) and its failures as a HalpError saying what ``failed``."""
        logger = _require("polygraphy.logger").G_LOGGER
        exception = _require("polygraphy.exception")
        try:
            with logger.verbosity(logger.WARNING):
                yield
        except exception.PolygraphyException as exc:
            raise HalpError(f"TensorRT {self.trt.__version__} {failed}: {exc}") from exc

    def build_engine(self, model: onnx.ModelProto, out_dir: Path, name: str) -> Path:
        return atomic_write_bytes(Path(out_dir) / f"{name}.plan", self._plan(model))

    def engine_timer(self, path: Path,
                     inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        return self._plan_timer(Path(path).read_bytes(), inputs)

    def onnx_timer(self, model: onnx.ModelProto | bytes | str | Path,
                   inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        """One engine build (seconds on a Jetson) for every call of the result."""
        return self._plan_timer(self._plan(model), inputs)

    def describe(self) -> BackendInfo:
        device = self.cuda.Context.get_device()  # the device the engines run on, not device 0
        polygraphy = _require("polygraphy")
        pycuda = _require("pycuda")
        driver = self.cuda.get_driver_version()
        return BackendInfo(
            backend=self.name, precision=self.precision, device=device.name(),
            device_key=cuda_key(device.name(), device.compute_capability()),
            versions={"tensorrt": self.trt.__version__, "polygraphy": polygraphy.__version__,
                      "pycuda": pycuda.VERSION_TEXT, "cuda_driver": str(driver),
                      "numpy": np.__version__},
            threads=None, settings=self.settings, provider="TensorRT builder, TF32 on")
