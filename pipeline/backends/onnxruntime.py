"""ONNX Runtime backend: the CPU target in CI, and the CUDA execution provider where installed."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ..errors import BackendUnavailable, HalpError
from ..fsio import atomic_write_bytes
from ..kinds import DeviceKind, Precision
from ..onnx_layers import fixed_part
from ..onnx_weights import DetachedModel
from ..spec import LayerSpec
from .capabilities import BackendInfo
from .device import channel_step, cpu_key, cpu_name, cuda_key, thread_count
from .onnx_base import OnnxBackend, onnx_bytes
from .timing import Measurement, TimingSettings, host_timer, measure

_PROVIDERS = {DeviceKind.CPU: "CPUExecutionProvider", DeviceKind.CUDA: "CUDAExecutionProvider"}
#: optimisers off for packed layer graphs: the copies' identical prologues (a pooling of the
#: shared input) would be merged into one, where the network runs one per layer
PACKED_DISABLED_OPTIMIZERS = ("CommonSubexpressionElimination",)


@lru_cache(maxsize=None)
def cpu_blocks_feature_maps() -> bool:
    """Whether ONNX Runtime runs convolutions on this CPU in its blocked NCHWc layout (x86 with
    AVX2 or AVX-512), asked of ONNX Runtime itself: a 16-channel convolution, optimised, comes
    back between layout conversions exactly when it does."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1] * 4)], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, [16, 16, 3, 3], [0.0] * 2304)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "probe.onnx")
        ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                             providers=[_PROVIDERS[DeviceKind.CPU]])
        optimised = onnx.load(opts.optimized_model_filepath)
    return any(n.op_type == "ReorderInput" for n in optimised.graph.node)


class OnnxRuntimeBackend(OnnxBackend):
    """Times InferenceSessions with every graph optimisation on and a pinned thread count.

    ``threads`` is the intra-op thread count (default: the physical cores this process may
    use); inter-op parallelism is off and execution sequential, so a layer's time does not
    depend on what else the scheduler overlaps it with. Its engine is the model saved after
    those optimisations (:meth:`build_engine`).
    """

    name = "onnxruntime"

    def __init__(self, precision: Precision = Precision.FP32, *,
                 settings: TimingSettings | None = None, threads: int | None = None,
                 device: str = "cpu"):
        if device not in _PROVIDERS:
            raise HalpError(f"onnxruntime device {device!r} is not one of {', '.join(_PROVIDERS)}")
        if precision != Precision.FP32:
            raise HalpError(
                f"the onnxruntime backend times fp32 models only, not {precision}; for fp16 use "
                "the tensorrt backend (or torch on a CUDA device)"
            )
        if device == DeviceKind.CUDA and _PROVIDERS[DeviceKind.CUDA] not in \
                ort.get_available_providers():
            raise BackendUnavailable(
                "onnxruntime has no CUDAExecutionProvider here (available: "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a "
                "machine with an NVIDIA GPU, or use device='cpu'"
            )
        self.precision = precision
        self.device = DeviceKind(device)
        self.settings = (settings or TimingSettings()).resolved(self.device)
        self.threads = thread_count(threads)
        self.default_step = channel_step(self.device)
        self.blocked_layout = self.device == DeviceKind.CPU and cpu_blocks_feature_maps()
        self._fixed: dict[tuple, float] = {}

    def _options(self) -> ort.SessionOptions:
        """Every graph optimisation, sequential execution, the pinned thread count."""
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # warnings about unused initializers are noise here
        return opts

    def _session(self, data: bytes, weights: Mapping[str, np.ndarray] | None = None,
                 disabled: tuple[str, ...] = ()) -> ort.InferenceSession:
        """A session for the serialized model; ``weights``: the values of its external
        initializers, taken from memory; ``disabled``: graph optimisers left out."""
        opts = self._options()
        if weights:
            opts.add_external_initializers(
                list(weights), [ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()])
        try:
            return ort.InferenceSession(data, sess_options=opts,
                                        providers=[_PROVIDERS[self.device]],
                                        disabled_optimizers=list(disabled))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise HalpError(f"ONNX Runtime cannot load the model: {exc}") from exc

    def _binding(self, sess: ort.InferenceSession,
                 inputs: dict[str, np.ndarray]) -> ort.IOBinding:
        """Inputs and outputs bound once, so the timed loop is the run and nothing else."""
        expected = [i.name for i in sess.get_inputs()]
        if sorted(expected) != sorted(inputs):
            raise HalpError(f"the model takes inputs {expected}, got {sorted(inputs)}")
        binding = sess.io_binding()
        for name, array in inputs.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)
            binding.bind_ortvalue_input(name, value)
        for out in sess.get_outputs():
            binding.bind_output(out.name, self.device)
        sess.run_with_iobinding(binding)  # allocates the outputs; reuse them from now on
        for out, value in zip(sess.get_outputs(), binding.get_outputs()):
            binding.bind_ortvalue_output(out.name, value)
        return binding

    def onnx_timer(self, model: onnx.ModelProto | bytes | str | Path,
                   inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        """One session and binding, kept for every call (creating a session costs more than a
        measurement of a small network)."""
        return self._timer(self._session(onnx_bytes(model)), inputs)

    def _timer(self, sess: ort.InferenceSession,
               inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        binding = self._binding(sess, inputs)
        run = host_timer(lambda: sess.run_with_iobinding(binding))
        return lambda: measure(run, self.settings)

    def build_engine(self, model: onnx.ModelProto, out_dir: Path, name: str) -> Path:
        """The model after ONNX Runtime's full graph optimisation (fusions, constant folding),
        as ``<name>.ort.onnx``.

        The result can contain CPU-specific fused ops: it is an engine for this kind of
        machine, like a TensorRT plan is for one GPU.
        """
        out = Path(out_dir) / f"{name}.ort.onnx"
        tmp = out.with_name(out.name + ".partial")
        opts = self._options()
        opts.optimized_model_filepath = str(tmp)
        try:
            ort.InferenceSession(onnx_bytes(model), sess_options=opts,
                                 providers=[_PROVIDERS[DeviceKind.CPU]])
            return atomic_write_bytes(out, tmp.read_bytes())
        finally:
            tmp.unlink(missing_ok=True)

    def detached_timer(self, graph: DetachedModel,
                       inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        sess = self._session(graph.model.SerializeToString(), graph.weights,
                             PACKED_DISABLED_OPTIMIZERS)
        return self._timer(sess, inputs)

    def fixed_cost(self, layer: LayerSpec, cin: int, cout: int,
                   inputs: dict[str, np.ndarray]) -> float:
        """The fixed part's time, measured once per set of input shapes (a table has a few
        hundred), the fastest of three measurements: it is the floor a point is cut by."""
        key = tuple(sorted((name, a.shape) for name, a in inputs.items()))
        if key not in self._fixed:
            timer = self.onnx_timer(fixed_part(layer, cin, cout), inputs)
            self._fixed[key] = min(timer().ms for _ in range(3))
        return self._fixed[key]

    def engine_timer(self, path: Path,
                     inputs: dict[str, np.ndarray]) -> Callable[[], Measurement]:
        return self.onnx_timer(path, inputs)

    def describe(self) -> BackendInfo:
        if self.device == DeviceKind.CPU:
            device, key = cpu_name(), cpu_key(self.threads)
        else:
            import torch  # ORT exposes no device name; torch (a dependency) does

            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda"
            key = cuda_key(device)
        return BackendInfo(
            backend=self.name, precision=self.precision, device=device, device_key=key,
            provider=_PROVIDERS[self.device],
            versions={"onnxruntime": ort.__version__, "onnx": onnx.__version__,
                      "numpy": np.__version__},
            threads=self.threads, settings=self.settings)
