"""TensorRT backend: engines built from ONNX with polygraphy, timed with CUDA events (pycuda).

Written against the TensorRT 10.x and 11.x Python APIs (name-based I/O: ``num_io_tensors``,
``get_tensor_name/shape/dtype/mode``, ``IExecutionContext.set_tensor_address``,
``execute_async_v3``), polygraphy 0.49+ loaders (``NetworkFromOnnxBytes(strongly_typed=)``,
``CreateConfig``, ``EngineBytesFromNetwork``, ``engine_from_bytes``, ``PolygraphyException``,
``G_LOGGER.verbosity``), pycuda 2022.2+ (``autoprimaryctx``, ``Context.get_device``,
``Event.record(stream)``, ``Event.time_till``, ``Stream.handle``) and, when installed,
cuda-python's runtime bindings for CUDA graphs (``cudaStreamBeginCapture``,
``cudaStreamEndCapture``, ``cudaGraphInstantiateWithFlags``, ``cudaGraphLaunch``; no pycuda
release wraps stream capture). ``tensorrt``, ``pycuda`` and ``cuda`` are imported inside
functions only: nothing else in the package imports them, and the package works without them.

fp16 is carried by the graph's types, on every supported version: TensorRT 11 removed
``BuilderFlag.FP16`` (``include/NvInfer.h`` and ``python/src/infer/pyCore.cpp`` at 11.0/11.1
list no FP16 flag; every network is strongly typed and ``NetworkDefinitionCreationFlag
.STRONGLY_TYPED`` is "deprecated and ignored"), so polygraphy's ``CreateConfig(fp16=True)``
fails there ("fp16 in CreateConfig is not available"). An fp16 engine is built from the graph
converted to float16 end to end (:mod:`pipeline.onnx_fp16`: fp16 inputs and outputs, as inside
a network, so no engine pays conversions at its edges), strongly typed on 10.x too (where
``STRONGLY_TYPED`` is a real flag and the FP16 builder flag must then stay off: the builder
rejects the pair with "condition: !config.getFlag(BuilderFlag::kFP16)", and trtexec 10.3 drops
``--fp16`` under ``--stronglyTyped`` while keeping TF32, ``samples/common/sampleOptions.cpp``),
so 10.x and 11.x time the same precision.

TensorRT 8.5 and 8.6 (JetPack 5 on Xavier, JetPack 6.0) have the same name-based I/O and
``execute_async_v3`` (``python/src/infer/pyCore.cpp`` at the 8.5.3 tag) but no strongly typed
networks (no ``STRONGLY_TYPED`` up to 8.6.1): there the float16 graph is built with
``BuilderFlag.FP16``, which 8.x has, so its engines take and give float16 as on 10.x and 11.x.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import weakref
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx

from ..errors import BackendUnavailable, HalpError
from ..fsio import atomic_write_bytes
from ..kinds import DeviceKind, Precision
from ..onnx_fp16 import detached_to_float16, to_float16
from ..onnx_weights import DetachedModel
from .capabilities import BackendInfo
from .device import channel_step, cuda_key
from .onnx_base import OnnxBackend, onnx_bytes
from .timing import BatchTimer, Measurement, TimingSettings, measure

log = logging.getLogger(__name__)

#: TensorRT major versions pip installs for this backend (the extra's bound in pyproject)
SUPPORTED_MAJORS = (10, 11)
#: older TensorRT a Jetson brings with JetPack (not pip-installable there): 8.5 and 8.6
JETPACK_VERSIONS = ((8, 5), (8, 6))
INSTALL_HINT = (
    "the tensorrt backend needs TensorRT 10 or 11 (or JetPack's 8.5/8.6) and pycuda on a "
    "machine with an NVIDIA GPU (cuda-python too, to time layers as CUDA graphs): pip install "
    "'.[tensorrt]' (the `tensorrt` extra; on Jetson use JetPack's TensorRT and pip install "
    "pycuda cuda-python)"
)


def check_version(version: str) -> int:
    """The major version of TensorRT ``version``; BackendUnavailable unless it is one of
    :data:`SUPPORTED_MAJORS` or a :data:`JETPACK_VERSIONS` release. 8.5 is the first with
    name-based I/O and ``execute_async_v3``; 9.x never shipped for Jetson and is untested; a
    future major may remove what 11 only deprecated (``STRONGLY_TYPED``, which polygraphy's
    ``strongly_typed`` reads)."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        major = minor = -1
    if major not in SUPPORTED_MAJORS and (major, minor) not in JETPACK_VERSIONS:
        supported = " and ".join(f"{m}.x" for m in SUPPORTED_MAJORS)
        raise BackendUnavailable(
            f"TensorRT {version} is not supported: the tensorrt backend supports TensorRT "
            f"{supported} (pip install 'tensorrt>=10,<12') and JetPack's 8.5 and 8.6 on "
            "Jetson Xavier and Orin")
    return major


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

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.handle):
            raise HalpError("TensorRT execute_async_v3 failed; see the TensorRT log")

    def timer(self, graphs: bool = True) -> BatchTimer:
        """``time_batch(k)``: CUDA events around ``k`` runs, each sample behind a lead batch.

        The runs are a CUDA graph of ``k`` captured ``execute_async_v3`` calls (:class:`_Graphs`,
        with cuda-python; ``graphs=False`` or a failed capture: ``k`` direct enqueues). Before
        the start event, the same batch runs once more: the stream is busy while the host
        records the start event and launches the timed batch, so the interval holds GPU work
        only, not the host's launch latency. Direct enqueues (the fallback) still cost the host
        more per run than a small layer costs the GPU (TensorRT's enqueue is microseconds of
        Python and driver calls); then the lead only hides the first launch, and the sample is
        bounded by the host's enqueue rate. The captured graph is launched in one call per
        sample, whatever ``k``, so the GPU never waits for the host.
        """
        cuda = _cuda()
        self.graphs = _Graphs.create(self) if graphs else None

        def run(k: int) -> None:
            if self.graphs is not None:
                try:
                    self.graphs.launch(k)
                    return
                except _CaptureFailed as exc:
                    log.warning("timing TensorRT runs as direct enqueues: %s", exc)
                    self.graphs = None
            for _ in range(k):
                self.enqueue()

        def time_batch(k: int) -> float:
            start, end = cuda.Event(), cuda.Event()
            run(k)  # the lead: keeps the stream busy while the timed batch is launched
            start.record(self.stream)
            run(k)
            end.record(self.stream)
            end.synchronize()
            return start.time_till(end)

        return time_batch


def _cuda_python_version(rt: ModuleType) -> str:
    try:
        from importlib.metadata import version

        return version("cuda-python")
    except Exception:  # cuda-bindings alone, or an unusual install
        return getattr(rt, "__version__", "unknown")


class _CaptureFailed(Exception):
    """The engine's enqueue could not be captured as a CUDA graph (a reason to fall back)."""


@lru_cache(maxsize=None)
def _cudart() -> ModuleType | None:
    """cuda-python's CUDA runtime bindings (``cuda.bindings.runtime``; older releases only have
    ``cuda.cudart``, which newer ones deprecate and cuda-bindings 13 no longer ships), or None
    when cuda-python is not installed. Asked once: a failed import is not cached by Python,
    and every table point asks."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except (ImportError, OSError):
            continue
    return None


class _Graphs:
    """``k`` back-to-back ``execute_async_v3`` calls of one context, captured once per ``k``
    as a CUDA graph on the bindings' stream and launched with one ``cudaGraphLaunch``.

    As TensorRT's trtexec does (``samples/common/sampleInference.cpp``): one enqueue and a
    stream synchronize before capturing, so the capture records no initialization work;
    ``cudaStreamCaptureModeThreadLocal``; an enqueue that returns false under capture (an
    engine with operations a graph cannot hold) ends the capture and falls back to direct
    enqueues. pycuda's stream handle is a ``cudaStream_t`` of the same (primary) context.
    """

    def __init__(self, rt: ModuleType, bindings: _Bindings):
        self.rt, self.bindings = rt, bindings
        self.execs: dict[int, object] = {}
        weakref.finalize(self, _Graphs._destroy, rt, self.execs)

    @classmethod
    def create(cls, bindings: _Bindings) -> _Graphs | None:
        rt = _cudart()
        return None if rt is None else cls(rt, bindings)

    @staticmethod
    def _destroy(rt: ModuleType, execs: dict[int, object]) -> None:
        for exe in execs.values():
            rt.cudaGraphExecDestroy(exe)

    def _call(self, result: tuple, what: str) -> tuple:
        """cuda-python returns (error, *values)."""
        if result[0] != self.rt.cudaError_t.cudaSuccess:
            raise _CaptureFailed(f"{what} failed: {result[0]!r}")
        return result[1:]

    def launch(self, k: int) -> None:
        if k not in self.execs:
            self.execs[k] = self._capture(k)
        self._call(self.rt.cudaGraphLaunch(self.execs[k], self.bindings.stream.handle),
                   "cudaGraphLaunch")

    def _capture(self, k: int) -> object:
        rt, stream = self.rt, self.bindings.stream
        self.bindings.enqueue()
        stream.synchronize()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call(rt.cudaStreamBeginCapture(stream.handle, mode), "cudaStreamBeginCapture")
        captured = False
        try:
            captured = all(self.bindings.context.execute_async_v3(stream.handle)
                           for _ in range(k))
        finally:
            err, graph = rt.cudaStreamEndCapture(stream.handle)  # always leave capture mode
        try:
            if not captured or err != rt.cudaError_t.cudaSuccess:
                rt.cudaGetLastError()  # clear the capture's error, as trtexec does
                raise _CaptureFailed("the engine cannot be captured as a CUDA graph "
                                     f"(execute_async_v3 {'ok' if captured else 'failed'}, "
                                     f"cudaStreamEndCapture {err!r})")
            # ...WithFlags: the same call in cuda-python 11.x, 12.x and 13.x
            (exe,) = self._call(rt.cudaGraphInstantiateWithFlags(graph, 0),
                                "cudaGraphInstantiateWithFlags")
            return exe
        finally:
            if err == rt.cudaError_t.cudaSuccess:
                rt.cudaGraphDestroy(graph)


class TensorRTBackend(OnnxBackend):
    """Builds an engine per ONNX model at the backend's precision and times it on the device of
    pycuda's primary context; its engine files are the serialized plans (``.plan``)."""

    name = "tensorrt"
    #: TensorRT removes layers whose outputs nobody reads: every copy's output is kept
    packed_outputs = "all"

    def __init__(self, precision: Precision = Precision.FP32, *,
                 settings: TimingSettings | None = None):
        self.trt = _require("tensorrt")
        self.major = check_version(self.trt.__version__)
        self.loaders = _require("polygraphy.backend.trt")
        self.cuda = _cuda()
        self.precision = precision
        self.settings = (settings or TimingSettings()).resolved(DeviceKind.CUDA)
        self.default_step = channel_step(DeviceKind.CUDA)

    def _typed(self, model: onnx.ModelProto | bytes | str | Path) -> bytes:
        """The ONNX model at the backend's precision, serialized: at fp16 every float tensor
        float16 (:func:`~pipeline.onnx_fp16.to_float16`; an already-float16 graph converts to
        itself)."""
        if self.precision != Precision.FP16:
            return onnx_bytes(model)
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(
            onnx_bytes(model))
        return to_float16(proto).SerializeToString()

    def _plan(self, typed: bytes) -> bytes:
        """A serialized TensorRT plan for an ONNX model typed at the backend's precision
        (:meth:`_typed`).

        fp16 is the graph's types, in a strongly typed network (the module docstring says why);
        ``strongly_typed`` is passed on 10.x only, since 11.x builds every network so and only
        keeps the flag as a deprecated no-op. No precision flag is set, except on 8.x, which
        has no strongly typed networks and takes the float16 graph with ``BuilderFlag.FP16``.
        TF32 is on, as in TensorRT's own builder config and trtexec: polygraphy's
        ``CreateConfig`` defaults to ``tf32=False`` and clears the flag, which would time strict
        FP32 kernels on Ampere and Orin that no deployed "fp32" engine runs.
        """
        fp16 = self.precision == Precision.FP16
        strongly_typed = fp16 and self.major == 10
        # lazy loaders: the builder and network live only inside the build call
        build = self.loaders.EngineBytesFromNetwork(
            self.loaders.NetworkFromOnnxBytes(typed, strongly_typed=strongly_typed),
            config=self.loaders.CreateConfig(tf32=True, fp16=fp16 and self.major == 8),
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
        """The plan of ``model``; at fp16 its inputs and outputs are float16 (feed it so)."""
        return atomic_write_bytes(Path(out_dir) / f"{name}.plan",
                                  self._plan(self._typed(model)))

    def engine_timer(self, path: Path,
                     inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        return self._plan_timer(Path(path).read_bytes(), inputs)

    def onnx_timer(self, model: onnx.ModelProto | bytes | str | Path,
                   inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        """One engine build (seconds on a Jetson) for every call of the result."""
        return self._plan_timer(self._plan(self._typed(model)), inputs)

    def detached_timer(self, graph: DetachedModel,
                       inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        """A table point: its weights cast to float16 in memory at fp16, then embedded."""
        if self.precision == Precision.FP16:
            graph = detached_to_float16(graph)
        return self._plan_timer(self._plan(graph.embedded().SerializeToString()), inputs)

    def describe(self) -> BackendInfo:
        device = self.cuda.Context.get_device()  # the device the engines run on, not device 0
        polygraphy = _require("polygraphy")
        pycuda = _require("pycuda")
        rt = _cudart()
        driver = self.cuda.get_driver_version()
        return BackendInfo(
            backend=self.name, precision=self.precision, device=device.name(),
            device_key=cuda_key(device.name(), device.compute_capability()),
            versions={"tensorrt": self.trt.__version__, "polygraphy": polygraphy.__version__,
                      "pycuda": pycuda.VERSION_TEXT, "cuda_driver": str(driver),
                      **({"cuda_python": _cuda_python_version(rt)} if rt is not None else {}),
                      "numpy": np.__version__},
            threads=None, settings=self.settings, provider=self.provider())

    def provider(self) -> str:
        """How engines are built and timed, as tables record it."""
        typed = ""
        if self.precision == Precision.FP16:
            typed = ", float16 graphs, " + ("FP16 flag" if self.major == 8 else "strongly typed")
        runs = "CUDA graphs" if _cudart() is not None else "direct enqueues"
        return f"TensorRT builder, TF32 on{typed}; timed as {runs}"
