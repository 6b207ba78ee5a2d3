"""ONNX Runtime backend: the CPU target in CI, and the CUDA execution provider where installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import BackendUnavailable, HalpError
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
)

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


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

    def _session(self, data: bytes) -> ort.InferenceSession:
        opts = ort.SessionOptions()
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

