"""ONNX Runtime backend: the CPU target in CI, and the CUDA execution provider where installed."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import BackendUnavailable, HalpError
from ..onnx_layers import layer_input, layer_model
from ..structure import LayerSpec
from . import OnnxBackend, onnx_bytes
from .timing import (
    Measurement,
    TimingSettings,
    cpu_name,
    default_threads,
    host_timer,
    measure,
    simd_channels,
    slug,
    warm_up,
)

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: ONNX Runtime's layout conversions at a graph's edges. Inside a network the CPU provider keeps
#: activations in its blocked layout (NCHWc) from one convolution to the next, so a layer timed
#: alone must not be charged for converting its input and output (35-65% of a small layer).
LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput"})


class OnnxRuntimeBackend(OnnxBackend):
    """Times InferenceSessions with every graph optimisation on and a pinned thread count.

    ``threads`` is the intra-op thread count (default: the physical cores this process may
    use); inter-op parallelism is off and execution sequential, so a layer's time does not
    depend on what else the scheduler overlaps it with.
    """

    name = "onnxruntime"

    def __init__(self, precision: str = "fp32", *, settings: TimingSettings | None = None,
                 threads: int | None = None, device: str = "cpu"):
        if device not in _PROVIDERS:
            raise HalpError(f"onnxruntime device {device!r} is not one of {', '.join(_PROVIDERS)}")
        if precision != "fp32":
            raise HalpError(
                f"the onnxruntime backend times fp32 models only, not {precision}; for fp16 use "
                "the tensorrt backend (or torch on a CUDA device)"
            )
        if device == "cuda" and _PROVIDERS["cuda"] not in ort.get_available_providers():
            raise BackendUnavailable(
                "onnxruntime has no CUDAExecutionProvider here (available: "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a "
                "machine with an NVIDIA GPU, or use device='cpu'"
            )
        if threads is not None and threads < 1:
            raise HalpError(f"threads must be >= 1, got {threads}")
        self.precision = precision
        self.settings = (settings or TimingSettings()).resolved(
            "p10" if device == "cpu" else "median")
        self.device = device
        self.threads = threads or default_threads()
        #: LUT grid step and pruning unit: the kernel's channel block (CUDA EP: tensor cores' 8)
        self.default_step = simd_channels() if device == "cpu" else 8

    def _session(self, data: bytes, profile_prefix: str | None = None) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        if profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # warnings about unused initializers are noise here
        try:
            return ort.InferenceSession(data, sess_options=opts,
                                        providers=[_PROVIDERS[self.device]])
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
        for out, value in zip(sess.get_outputs(), binding.get_outputs(), strict=True):
            binding.bind_ortvalue_output(out.name, value)
        return binding

    def time_onnx(self, model: onnx.ModelProto | bytes | str | Path,
                  inputs: dict[str, np.ndarray]) -> Measurement:
        sess = self._session(onnx_bytes(model))
        binding = self._binding(sess, inputs)
        return measure(host_timer(lambda: sess.run_with_iobinding(binding)), self.settings)

    def time_layer(self, layer: LayerSpec, cin: int, cout: int) -> Measurement:
        """The layer's kernel time as it runs inside a network: ORT's profiler times each node,
        and the layout conversions ORT adds at the single-layer graph's edges are left out."""
        data = layer_model(layer, cin, cout).SerializeToString()
        with tempfile.TemporaryDirectory(prefix="halp-ort-") as tmp:
            sess = self._session(data, profile_prefix=str(Path(tmp) / "layer"))
            binding = self._binding(sess, {"x": layer_input(layer, cin)})
            warm, inner = warm_up(host_timer(lambda: sess.run_with_iobinding(binding)),
                                  self.settings)
            for _ in range(self.settings.repeats * inner):
                sess.run_with_iobinding(binding)
            events = json.loads(Path(sess.end_profiling()).read_text())
        return _kernel_measurement(events, skip=warm + 1, settings=self.settings, inner=inner)

    def describe(self) -> dict:
        if self.device == "cpu":
            device = cpu_name()
            key = f"cpu-{slug(device)}-t{self.threads}"
        else:
            import torch  # ORT exposes no device name; torch (a dependency) does

            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda"
            key = f"cuda-{slug(device)}"
        return {
            "backend": self.name,
            "precision": self.precision,
            "device": device,
            "device_key": key,
            "provider": _PROVIDERS[self.device],
            "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__,
                         "numpy": np.__version__},
            "threads": self.threads,
            "settings": self.settings.to_dict(),
        }


def _kernel_measurement(events: list[dict], *, skip: int, settings: TimingSettings,
                        inner: int) -> Measurement:
    """Per run, the summed kernel time of every node but the layout conversions; the first
    ``skip`` runs (binding's first run and the warm-up) are dropped, the rest averaged over
    ``inner`` consecutive runs per sample."""
    per_node: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if (e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
                and e.get("args", {}).get("op_name") not in LAYOUT_OPS):
            per_node[e["name"]].append(e["dur"] / 1e3)  # microseconds -> ms
    if not per_node:
        raise HalpError("ONNX Runtime's profile has no kernel events for this layer")
    repeats = settings.repeats
    runs = np.sum([durations[skip:skip + repeats * inner] for durations in per_node.values()],
                  axis=0)
    return Measurement.from_samples(runs.reshape(repeats, inner).mean(axis=1), inner,
                                    settings.statistic)
